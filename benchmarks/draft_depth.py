"""Does a shallower draft pay? Acceptance and draft cost for drafts that skip some of their layers, in one run.

    python benchmarks/draft_depth.py BUNDLE DRAFT_MODEL [--keep all 0-19 0-11,16-23 ...]

Each ``--keep`` spec names the draft source's decoder blocks a variant keeps (``all``, or ranges
such as ``0-19`` for an early exit after block 19, ``0-9,14-23`` for four middle blocks
skipped); the variant's graph runs those blocks, then the final norm and the same LM head
(the bundle's draft vocabulary and head storage). No retraining: this asks whether the
source's own intermediate layers already predict the target well enough. Every variant is
swapped into the loaded bundle and runs the same prompts (benchmarks/prompts: code, edit,
chat) in speculative mode, in turn, after one target-only run per prompt; the target still
verifies, so every output must equal the target's. One-token draft steps are also timed
alone, interleaved. The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

from draft_vocab import build_draft, prompts, run_variants, summarize, time_steps  # noqa: E402


def parse_keep(spec: str, num_layers: int) -> list[int] | None:
    """``all`` -> None; ``0-9,14-23`` -> [0, ..., 9, 14, ..., 23] (checked against ``num_layers``)."""
    if spec == "all":
        return None
    keep: list[int] = []
    for part in spec.split(","):
        lo, _, hi = part.partition("-")
        try:
            first, last = int(lo), int(hi or lo)
        except ValueError:
            raise SystemExit(f"--keep {spec!r}: allowed: 'all' or ranges like 0-19 or 0-9,14-23") from None
        if first > last or (keep and first <= keep[-1]) or first < 0 or last >= num_layers:
            raise SystemExit(f"--keep {spec!r}: allowed: increasing block indices 0-{num_layers - 1}")
        keep.extend(range(first, last + 1))
    return keep


def main() -> None:
    import edgellm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("draft_model", help="the draft's source (the GGUF file or HF folder it was exported from)")
    ap.add_argument("--keep", nargs="*", default=["all", "0-21", "0-10,13-23", "0-19", "0-9,14-23", "0-5,8-11,14-17,20-23"],
                    help="blocks each variant keeps: 'all' or increasing ranges")
    ap.add_argument("--per-category", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDGELLM_THREADS", "2")))
    a = ap.parse_args()
    llm = edgellm.load(a.bundle, threads=a.threads)
    entry = llm.manifest.draft
    head = entry.quantization.get("lm_head_quant") or "int8"
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for spec in a.keep:
            keep = parse_keep(spec, entry.num_layers)
            name = f"{len(keep) if keep else entry.num_layers} blocks ({spec})"
            variants[name], build_s, nbytes = build_draft(llm, a.draft_model, "bundle", head,
                                                          Path(tmp) / f"v{len(variants)}", keep_layers=keep)
            print(f"built draft {name}: {nbytes / 1e6:.0f} MB in {build_s:.0f} s", file=sys.stderr)
        steps = time_steps(variants)
        ps = prompts(a.per_category)
        runs = run_variants(llm, variants, ps, a.max_new_tokens, 0.0)
    summary = summarize(variants, ps, runs)
    print(json.dumps({"threads": a.threads, "max_new_tokens": a.max_new_tokens, "draft_vocab": (entry.draft_vocab or {}).get("size"),
                      "draft_head": head, "steps": steps, "summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
