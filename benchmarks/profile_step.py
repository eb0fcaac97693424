"""Where a decoding step's time goes: onnxruntime's profiler, per operator type, per pass shape.

    python benchmarks/profile_step.py BUNDLE [BUNDLE ...] [--genai FOLDER ...] [--rows 1 2 4 8]

For each graph (a bundle's target and draft, and optionally onnxruntime-genai models of the same
model), one session with profiling on runs passes of ``k`` new tokens over ``--past`` cached
positions (the cache holds zeros: the time of a pass does not depend on the values), each pass
followed by a rollback, ``--passes`` times per ``k`` after two warm-up passes. It prints one
table (milliseconds per pass by operator type: the sum of that type's kernel times; ``run`` is
onnxruntime's whole run, ``wall`` what the caller waited, IO binding included) and, as the last
line, the JSON of every number.

A 1-row pass is what a plain decoder pays per token; edgellm's target mode pays the 2-row pass
(see ``DecoderSession.min_rows``), a verify of gamma drafts the (gamma + 1)-row pass, a draft
step the draft's 1-row pass.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def op_times(profile: Path) -> tuple[dict[str, list[float]], list[float]]:
    """Kernel microseconds per operator type per run, and each run's microseconds.

    Args:
        profile: onnxruntime's profile JSON.

    Returns:
        ``({op_type: [us of run i, ...]}, [us of run i, ...])`` for every run, in order.
    """
    events = json.loads(profile.read_text())
    runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run")
    per_op: dict[str, list[float]] = defaultdict(lambda: [0.0] * len(runs))
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        for i, (start, end) in enumerate(runs):
            if start <= e["ts"] <= end:
                per_op[e["args"]["op_name"]][i] += e["dur"]
                break
    return dict(per_op), [end - start for start, end in runs]


def bundle_runner(bundle: Path, role: str, threads: int, prefix: str) -> tuple[Any, Callable[[int, int], None]]:
    """A profiled session of a bundle's ``role`` graph and a function running one k-row pass at ``past``."""
    from edgellm.api import _logits_tokens
    from edgellm.bundle import read_manifest
    from edgellm.runtimes.providers import resolve_provider
    from edgellm.runtimes.session import DecoderSession, KVLayout

    entry = getattr(read_manifest(bundle), role)
    s = DecoderSession(bundle / entry.graph, KVLayout.from_entry(entry.to_dict()), resolve_provider("cpu"), threads,
                       profile_prefix=prefix, logits_tokens=_logits_tokens(bundle, entry))

    def run(k: int, past: int) -> None:
        s.length = past
        s.forward(np.ones(k, np.int64), k)

    return s.session, run


def genai_runner(folder: Path, threads: int, prefix: str) -> tuple[Any, Callable[[int, int], None]]:
    """The same for an onnxruntime-genai model folder, fed as its runtime feeds it (past in, present out)."""
    from edgellm.runtimes.providers import resolve_provider
    from edgellm.runtimes.graphs import open_session

    cfg = json.loads((folder / "genai_config.json").read_text())["model"]["decoder"]
    session, _ = open_session(folder / cfg["filename"], resolve_provider("cpu"), threads, profile_prefix=prefix)
    inputs = {i.name: i for i in session.get_inputs()}
    heads, head_dim = cfg["num_key_value_heads"], cfg["head_size"]
    pasts = [n for n in inputs if n.startswith("past_key_values")]

    def run(k: int, past: int) -> None:
        feeds = {"input_ids": np.ones((1, k), np.int64),
                 "attention_mask": np.ones((1, past + k), np.int64)}
        if "position_ids" in inputs:
            feeds["position_ids"] = np.arange(past, past + k, dtype=np.int64)[None]
        for n in pasts:
            feeds[n] = np.zeros((1, heads, past, head_dim), np.float32)
        session.run(None, feeds)

    return session, run


def profile(name: str, make: Callable[[str], tuple[Any, Callable[[int, int], None]]], rows: list[int],
            past: int, passes: int) -> dict[str, Any]:
    """Median milliseconds per pass, per operator type, for each k in ``rows``."""
    with tempfile.TemporaryDirectory() as tmp:
        session, run = make(str(Path(tmp) / "p"))
        walls: dict[int, list[float]] = {}
        for k in rows:
            for _ in range(2):
                run(k, past)
            walls[k] = []
            for _ in range(passes):
                t0 = time.perf_counter()
                run(k, past)
                walls[k].append(1e3 * (time.perf_counter() - t0))
        path = Path(session.end_profiling())
        all_ops, all_totals = op_times(path)
        out: dict[str, Any] = {}
        for j, k in enumerate(rows):
            start = j * (passes + 2) + 2  # two warm-up passes before each k
            ops = {op: times[start:start + passes] for op, times in all_ops.items()}
            totals = all_totals[start:start + passes]
            out[str(k)] = {"ops": {op: statistics.median(t) / 1e3 for op, t in ops.items()},
                           "run": statistics.median(totals) / 1e3, "wall": statistics.median(walls[k])}
    print(f"{name}: " + ", ".join(f"{k} rows {v['wall']:.1f} ms" for k, v in out.items()), file=sys.stderr)
    return out


def render(results: dict[str, dict[str, Any]], top: int = 12) -> str:
    """A markdown table: one column per (graph, rows), one row per operator type (largest first)."""
    cols = [(g, k) for g, by_k in results.items() for k in by_k]
    total = defaultdict(float)
    for g, k in cols:
        for op, ms in results[g][k]["ops"].items():
            total[op] += ms
    ops = sorted(total, key=total.get, reverse=True)
    shown, rest = ops[:top], ops[top:]
    lines = ["| op (ms per pass) | " + " | ".join(f"{g} {k}-row" for g, k in cols) + " |",
             "|---|" + "---:|" * len(cols)]
    for op in shown:
        lines.append(f"| {op} | " + " | ".join(f"{results[g][k]['ops'].get(op, 0):.2f}" for g, k in cols) + " |")
    if rest:
        lines.append("| other | " + " | ".join(
            f"{sum(results[g][k]['ops'].get(op, 0) for op in rest):.2f}" for g, k in cols) + " |")
    for key in ("run", "wall"):
        lines.append(f"| **{key}** | " + " | ".join(f"**{results[g][k][key]:.2f}**" for g, k in cols) + " |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="*", type=Path, help="edgellm bundles (target and draft are profiled)")
    ap.add_argument("--genai", nargs="*", type=Path, default=[], help="onnxruntime-genai model folders")
    ap.add_argument("--rows", nargs="*", type=int, default=[1, 2, 5, 9], help="new tokens per target pass")
    ap.add_argument("--past", type=int, default=160, help="cached positions before each pass")
    ap.add_argument("--passes", type=int, default=20)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDGELLM_THREADS", "2")))
    ap.add_argument("--no-draft", action="store_true")
    a = ap.parse_args()
    results: dict[str, dict[str, Any]] = {}
    for b in a.bundles:
        results[f"{b.name} target"] = profile(f"{b.name} target", lambda p, b=b: bundle_runner(b, "target", a.threads, p),
                                              a.rows, a.past, a.passes)
        if not a.no_draft:
            results[f"{b.name} draft"] = profile(f"{b.name} draft", lambda p, b=b: bundle_runner(b, "draft", a.threads, p),
                                                 [1], a.past, a.passes)
    for g in a.genai:
        results[g.name] = profile(g.name, lambda p, g=g: genai_runner(g, a.threads, p), a.rows, a.past, a.passes)
    print(render(results))
    print(json.dumps({"threads": a.threads, "past": a.past, "passes": a.passes, "results": results}))


if __name__ == "__main__":
    main()
