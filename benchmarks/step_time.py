"""Plain-step time of several bundles' targets, interleaved in one run (medians), with their quality.

    python benchmarks/step_time.py BUNDLE [BUNDLE ...] [--rows 1 2] [--repeats 25] [--past 160]

All targets are loaded at once; each repeat runs one pass of ``k`` new tokens over ``--past``
cached positions on every bundle in turn (then rolls back), so every bundle sees the same
machine load. A 1-row pass is a plain decoder's step, the 2-row pass edgellm's target-mode step
(``DecoderSession.min_rows``). Each bundle's quality report gives its target's top-1 agreement
and mean KL against the fp32 graph. Human table on stderr, JSON as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def median_pass_ms(sessions: dict, ids: np.ndarray, past: int, rows: list[int], repeats: int) -> dict[str, dict[int, float]]:
    """Median milliseconds of one pass of ``r`` new tokens (``ids[past:past + r]``) over ``past``
    cached positions, per session name and ``r``; each repeat runs every session and ``r`` in
    turn, so all see the same machine load. Primes each session's cache with ``ids[:past]``
    and rolls back to it before each pass."""
    for s in sessions.values():
        s.rollback(0)
        s.forward(ids[:past], 1)
    times: dict[tuple[str, int], list[float]] = {(n, r): [] for n in sessions for r in rows}
    for _ in range(repeats):
        for name, s in sessions.items():
            for r in rows:
                s.rollback(past)
                t0 = time.perf_counter()
                s.forward(ids[past: past + r], r)
                times[(name, r)].append(time.perf_counter() - t0)
    return {n: {r: 1000 * statistics.median(times[(n, r)]) for r in rows} for n in sessions}


def main() -> None:
    from edgellm.api import _layout
    from edgellm.bundle import read_manifest
    from edgellm.runtimes.providers import resolve_provider
    from edgellm.runtimes.session import DecoderSession

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundles", nargs="+", type=Path)
    ap.add_argument("--rows", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--repeats", type=int, default=25)
    ap.add_argument("--past", type=int, default=160)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDGELLM_THREADS", "2")))
    a = ap.parse_args()
    sessions, quality = {}, {}
    for b in a.bundles:
        m = read_manifest(b)
        sessions[b.name] = DecoderSession(b / m.target.graph, _layout(m.target), resolve_provider("cpu"), a.threads)
        report = json.loads((b / m.quality_report).read_text())["models"].get("target", {})
        q = report.get("quantized_vs_fp32") or {}
        quality[b.name] = {"quantization": m.target.quantization, "top1_agreement": q.get("top1_agreement"),
                           "mean_kl": q.get("mean_kl")}
    vocab = min(s.layout.vocab_size for s in sessions.values())
    ids = np.random.default_rng(0).integers(3, min(vocab, 30000), a.past + max(a.rows))
    ms = median_pass_ms(sessions, ids, a.past, a.rows, a.repeats)
    result = {name: {**quality[name], **{f"ms_{r}_rows": ms[name][r] for r in a.rows}} for name in sessions}
    for name, r in result.items():
        kl = f"{r['mean_kl']:.4f}" if r["mean_kl"] is not None else "-"
        print(f"{name:40} " + " ".join(f"{r[f'ms_{k}_rows']:6.1f} ms ({k} rows)" for k in a.rows) + f"  KL {kl}",
              file=sys.stderr)
    print(json.dumps({"threads": a.threads, "past": a.past, "repeats": a.repeats, "bundles": result}))


if __name__ == "__main__":
    main()
