"""How many tokens should the draft's LM head keep? Acceptance and draft cost per subset size, in one run.

    python benchmarks/draft_vocab.py BUNDLE DRAFT_MODEL [--sizes 0 16384 32768 65536] [--head int8 int4]

For each (size, head storage) it builds the draft graph as ``edgellm export --draft-vocab SIZE``
would (0: the whole vocabulary) and swaps it into the loaded bundle, then runs the same prompts
(benchmarks/prompts: code, edit, chat) in speculative mode with every variant in turn, interleaved,
after one target-only run per prompt. Reports per variant: acceptance, tokens per round, draft
milliseconds per drafted token, ``c`` = that over the target's milliseconds per step, decode
tok/s, and whether every output equals the target's. The last line is the JSON of it all.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))


def build_draft(llm, model: str, size: int | str, head: str, out: Path, keep_layers: list[int] | None = None):
    """A draft session for ``size`` kept tokens (0: all; ``"bundle"``: the bundle draft's own) with its head stored as ``head``.

    ``keep_layers``: the source's decoder blocks to keep, in order (``None``: all of them); the
    others are skipped (a shallower draft: early exit, or layers skipped in the middle).
    Returns (bound session, seconds to build, bytes of its weights).
    """
    from edgellm.api import _Bound
    from edgellm.export.pipeline import _quant_config
    from edgellm.export.builder import DecoderBuilder
    from edgellm.export.draft_vocab import DraftVocabConfig
    from edgellm.export.source import open_source
    from edgellm.runtimes.graphs import read_token_ids
    from edgellm.runtimes.providers import resolve_provider
    from edgellm.runtimes.session import DecoderSession, KVLayout

    entry = llm.manifest.draft
    src = open_source(model)
    if keep_layers is not None:
        src = LayerSubset(src, keep_layers)
        entry = dataclasses.replace(entry, num_layers=len(keep_layers))
    q = entry.quantization
    qcfg = _quant_config(src, quant=q["quant"], block_size=q["block_size"], lm_head_quant=head)
    if size == "bundle":  # the tokens the bundle's own draft keeps
        dv = entry.draft_vocab
        tokens = None if dv is None else read_token_ids(llm.bundle / dv["file"], src.spec.vocab_size)
    else:
        chosen = DraftVocabConfig(size).choose(llm.bundle / llm.manifest.tokenizer["file"], src.spec.vocab_size,
                                               llm.tokenizer.eos_token_ids)
        tokens = chosen[0].astype(np.int64) if chosen else None
    out.mkdir(parents=True)
    t0 = time.perf_counter()
    graph = DecoderBuilder(src, qcfg, entry.max_context, logits_tokens=tokens).build(out)
    build_s = time.perf_counter() - t0
    session = DecoderSession(graph, KVLayout.from_entry(entry.to_dict()), resolve_provider("cpu"),
                             llm.target.session.session.get_session_options().intra_op_num_threads,
                             logits_tokens=tokens)
    return _Bound(session, entry), build_s, (out / "model.onnx.data").stat().st_size


class LayerSubset:
    """A weight source that shows only some of another's decoder blocks, renumbered 0..n-1.

    Args:
        src: the full source (:class:`~edgellm.export.source.Source`).
        keep: indices of ``src``'s blocks to keep, in the order the new graph runs them.
    """

    _BLOCK = re.compile(r"model\.layers\.(\d+)\.(.*)")

    def __init__(self, src, keep: list[int]) -> None:
        if not keep or any(not 0 <= i < src.spec.num_layers for i in keep):
            raise SystemExit(f"keep={keep}: allowed: indices 0-{src.spec.num_layers - 1}")
        self._src, self.keep = src, list(keep)
        self.spec = dataclasses.replace(src.spec, num_layers=len(keep))

    def _name(self, name: str) -> str:
        m = self._BLOCK.fullmatch(name)
        return name if m is None else f"model.layers.{self.keep[int(m[1])]}.{m[2]}"

    def tensor(self, name: str):
        return self._src.tensor(self._name(name))

    def has(self, name: str) -> bool:
        return self._src.has(self._name(name))

    def native(self, name: str):
        return self._src.native(self._name(name))

    def __getattr__(self, attr: str):
        return getattr(self._src, attr)


def use_draft(llm, draft) -> None:
    """Make ``draft`` the draft every generation of ``llm`` (slot 0) proposes with."""
    from edgellm.api import Slot

    llm.draft = draft
    llm.slots[0] = Slot(llm.target, draft)


def time_steps(variants: dict, past: int = 160, rounds: int = 30) -> dict:
    """Median milliseconds of a one-token step of each draft variant, interleaved, over ``past`` cached positions."""
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(rounds):
        for name, d in variants.items():
            d.session.length = past
            t0 = time.perf_counter()
            d.forward(np.ones(1, np.int64), 1)
            times[name].append(1e3 * (time.perf_counter() - t0))
    out = {name: statistics.median(ts) for name, ts in times.items()}
    for name, ms in out.items():
        print(f"draft {name}: {ms:.2f} ms a step", file=sys.stderr)
    return {"past": past, "rounds": rounds, "step_ms": out}


def prompts(per_category: int) -> list[dict]:
    out = []
    for cat in ("code", "edit", "chat"):
        for line in [x for x in (HERE / "prompts" / f"{cat}.jsonl").read_text().splitlines() if x.strip()][:per_category]:
            doc = json.loads(line)
            out.append({"id": doc["id"], "category": cat, "prompt": doc.get("prompt") or doc["messages"]})
    return out


def run_variants(llm, variants: dict, ps: list[dict], max_new_tokens: int, temperature: float) -> list[dict]:
    """Each prompt once in target mode, then in speculative mode with each draft variant in turn; one row per run."""
    runs = []
    for pr in ps:
        ref = llm.generate(pr["prompt"], mode="target", max_new_tokens=max_new_tokens)
        t_step = ref.stats["target_ms_per_step"]
        for name, draft in variants.items():
            use_draft(llm, draft)
            res = llm.generate(pr["prompt"], mode="speculative", max_new_tokens=max_new_tokens,
                               temperature=temperature, seed=0)
            s = res.stats
            ms_per_draft = s["draft_ms_per_round"] * s["rounds"] / max(s["drafted_tokens"], 1)
            runs.append({"variant": name, "prompt": pr["id"], "category": pr["category"],
                         "acceptance": s["acceptance_rate"], "tokens_per_round": s["mean_tokens_per_round"],
                         "draft_ms_per_token": ms_per_draft, "c": ms_per_draft / t_step,
                         "tokens_per_second": s["tokens_per_second"],
                         "target_tokens_per_second": ref.stats["tokens_per_second"],
                         "exact": temperature > 0 or res.token_ids == ref.token_ids})
            print(f"{pr['id']:>16} {name:>12} acc {s['acceptance_rate'] or 0:.2f} c {ms_per_draft / t_step:.3f} "
                  f"{s['tokens_per_second'] or 0:5.1f} tok/s (target {ref.stats['tokens_per_second']:.1f})",
                  file=sys.stderr)
    return runs


def summarize(variants: dict, ps: list[dict], runs: list[dict]) -> list[dict]:
    """Medians per variant and category (and over all prompts); prints them as a Markdown table."""
    med = lambda xs: statistics.median([x for x in xs if x is not None]) if any(x is not None for x in xs) else None  # noqa: E731
    summary = []
    for name in variants:
        for cat in sorted({p["category"] for p in ps}) + ["all"]:
            rs = [r for r in runs if r["variant"] == name and (cat == "all" or r["category"] == cat)]
            summary.append({"variant": name, "category": cat, "n": len(rs),
                            **{k: med([r[k] for r in rs]) for k in ("acceptance", "tokens_per_round",
                                                                    "draft_ms_per_token", "c", "tokens_per_second")},
                            "speedup": med([r["tokens_per_second"] / r["target_tokens_per_second"] for r in rs
                                            if r["tokens_per_second"]]),
                            "exact": all(r["exact"] for r in rs)})
    print("| draft | category | acceptance | tokens/round | draft ms/token | c | tok/s | speedup | exact |")
    print("|---|---|---:|---:|---:|---:|---:|---:|---|")
    for r in summary:
        print(f"| {r['variant']} | {r['category']} | {r['acceptance'] or 0:.3f} | {r['tokens_per_round']:.2f} | "
              f"{r['draft_ms_per_token']:.1f} | {r['c']:.3f} | {r['tokens_per_second']:.1f} | {r['speedup']:.2f}x | "
              f"{'yes' if r['exact'] else 'NO'} |")
    return summary


def main() -> None:
    import edgellm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path)
    ap.add_argument("draft_model", help="the draft's source (the GGUF file or HF folder it was exported from)")
    ap.add_argument("--sizes", nargs="*", type=int, default=[0, 16384, 32768, 65536])
    ap.add_argument("--head", nargs="*", default=["int8"], help="draft LM head storage(s) to try")
    ap.add_argument("--per-category", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--temperature", type=float, default=0.0)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDGELLM_THREADS", "2")))
    ap.add_argument("--steps-only", action="store_true",
                    help="only time one-token draft steps of each variant (interleaved), no generation")
    a = ap.parse_args()
    llm = edgellm.load(a.bundle, threads=a.threads)
    variants = {}
    with tempfile.TemporaryDirectory() as tmp:
        for size in a.sizes:
            for head in a.head:
                name = f"{size or 'all'}/{head}"
                variants[name], build_s, nbytes = build_draft(llm, a.draft_model, size, head, Path(tmp) / name.replace("/", "-"))
                print(f"built draft {name}: {nbytes / 1e6:.0f} MB in {build_s:.0f} s", file=sys.stderr)
        if a.steps_only:
            print(json.dumps(time_steps(variants)))
            return
        ps = prompts(a.per_category)
        runs = run_variants(llm, variants, ps, a.max_new_tokens, a.temperature)
    summary = summarize(variants, ps, runs)
    print(json.dumps({"threads": a.threads, "max_new_tokens": a.max_new_tokens, "temperature": a.temperature,
                      "summary": summary, "runs": runs}))


if __name__ == "__main__":
    main()
