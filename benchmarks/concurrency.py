"""Does drafting while the target verifies pay on this CPU? (issue: cross-EP placement)

Times, on the default bundle, one target verify pass of K+1 tokens and K draft steps:
sequentially with all threads each (what edgellm does), and concurrently on two Python threads
with half the threads each (what overlapping the draft's next proposal with the target's
verification would cost at best). onnxruntime releases the GIL while it runs.

    .venv/bin/python benchmarks/concurrency.py [--bundle B] [--k 4] [--repeats 20]

The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import threading
import time
from pathlib import Path

import numpy as np

import edgellm

CACHE = Path(os.environ.get("EDGELLM_CACHE", Path.home() / ".cache" / "edgellm"))


def timed_pair(llm, k: int, prompt: np.ndarray, concurrent: bool) -> float:
    """Seconds for one verify of k+1 tokens plus k draft steps, sequential or overlapped."""
    t, d = llm.target, llm.draft
    t.rollback(0), d.rollback(0)
    t.forward(prompt, 1), d.forward(prompt, 1)
    base_t, base_d = t.length, d.length

    def verify() -> None:
        t.rollback(base_t)
        t.forward(np.arange(5, 6 + k, dtype=np.int64), k + 1)

    def draft() -> None:
        d.rollback(base_d)
        for i in range(k):
            d.forward(np.array([7 + i], np.int64), 1)

    t0 = time.perf_counter()
    if concurrent:
        th = threading.Thread(target=draft)
        th.start()
        verify()
        th.join()
    else:
        verify()
        draft()
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bundle", type=Path, default=CACHE / "bundles/qwen2.5-coder-1.5b-q4km+0.5b-int4")
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--repeats", type=int, default=20)
    a = p.parse_args()
    cores = os.cpu_count() or 2
    prompt = np.arange(1000, 1100, dtype=np.int64)
    seq = edgellm.load(a.bundle, threads=cores, verify=False)
    half = edgellm.load(a.bundle, threads=max(1, cores // 2), verify=False)
    res: dict[str, list[float]] = {"sequential": [], "concurrent": []}
    for _ in range(a.repeats):  # interleaved
        res["sequential"].append(timed_pair(seq, a.k, prompt, False))
        res["concurrent"].append(timed_pair(half, a.k, prompt, True))
    med = {k: 1e3 * statistics.median(v) for k, v in res.items()}
    doc = {"k": a.k, "cores": cores, "sequential_ms": med["sequential"], "concurrent_ms": med["concurrent"],
           "concurrent_over_sequential": med["concurrent"] / med["sequential"]}
    print(f"verify {a.k + 1} tokens + {a.k} draft steps: sequential ({cores} threads each) {med['sequential']:.1f} ms, "
          f"concurrent ({max(1, cores // 2)} threads each) {med['concurrent']:.1f} ms")
    print(json.dumps(doc))


if __name__ == "__main__":
    main()
