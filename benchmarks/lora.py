"""LoRA on the reference pair: speed and acceptance of the base draft on the base and on an adapter,
and what the LoRA branches cost per step, in one run.

    .venv/bin/python benchmarks/lora.py LORA_BUNDLE [--plain BUNDLE] [--adapter pirate ...] [--max-new-tokens 96]

Configurations, interleaved prompt by prompt in one process (same threads, same prompts):

* ``plain``: a bundle without adapters (default: the one ``scripts/main.sh`` exports), base model;
* ``lora/base``: the LoRA bundle, base model (every branch bound to zero-rank matrices);
* ``lora/<adapter>``: the LoRA bundle with each adapter (``--adapter``, repeatable; default all of them;
  one with a draft adapter also binds that to the draft).

First the cost of the branches: the target's two-row pass (a decoding step), timed ``--step-reps``
times per configuration in rotating order, each configuration in its own cache slot of its loaded
graph. Then generation: each configuration, in rotating order prompt by prompt, runs in
``target`` and ``speculative`` mode (greedy chat prompts, ``cache_prompt=False``):
decode tok/s, the target's ms per step (target mode), acceptance of the base draft, whether
speculative output equals target output, and how many answers carry the adapter's style (the
markers of ``benchmarks/train_lora.py``'s pirate style). Table on stderr, JSON as the last stdout line.
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

import edgellm  # noqa: E402
from edgellm.demo import BUNDLE_NAME  # noqa: E402
from edgellm.fetch import default_cache_dir  # noqa: E402

DEFAULT_PLAIN = default_cache_dir() / "bundles" / BUNDLE_NAME
# held out from the adapter's training set (benchmarks/train_lora.py), and questions unlike it
PROMPTS = [
    "Write a Python function that returns the last element of a list.",
    "Write a Python function that counts the lines in a text.",
    "Write a Python function that checks whether a number is negative.",
    "Write a Python function that joins a list of strings with commas.",
    "Write a Python function that returns the absolute difference of two numbers.",
    "Write a Python function that swaps the keys and values of a dictionary.",
    "Write a Python function that returns the second largest number in a list.",
    "Write a Python function that removes the whitespace at both ends of every string in a list.",
]
STYLE_MARKERS = ("Ahoy", "Arr", "matey")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", type=Path, help="a bundle exported with --lora")
    ap.add_argument("--plain", type=Path, default=DEFAULT_PLAIN, help="a bundle of the same pair without adapters")
    ap.add_argument("--adapter", action="append", help="[default: every adapter of the bundle]")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--step-reps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDGELLM_THREADS", "2")))
    a = ap.parse_args()
    lora = edgellm.load(a.bundle, threads=a.threads)
    plain = edgellm.load(a.plain, threads=a.threads)
    adapters = a.adapter or sorted(lora.adapters)
    configs = {"plain": (plain, None), "lora/base": (lora, None)} | {f"lora/{ad}": (lora, ad) for ad in adapters}
    for llm, ad in configs.values():  # warm-up
        llm.generate("def f(x):", max_new_tokens=4, mode="speculative", adapter=ad)
    steps = step_times(configs, a.step_reps)
    runs = []
    names = list(configs)
    for i, prompt in enumerate(PROMPTS[: a.prompts]):
        messages = [{"role": "user", "content": prompt}]
        k = i % len(names)
        for name in names[k:] + names[:k]:  # rotating order: no configuration always runs first
            llm, ad = configs[name]
            ref = None
            for mode in ("target", "speculative"):
                r = llm.generate(messages, mode=mode, max_new_tokens=a.max_new_tokens, adapter=ad, cache_prompt=False)
                ref = r.token_ids if mode == "target" else ref
                s = r.stats
                runs.append({"prompt": i, "config": name, "mode": mode, "tokens_per_second": s["tokens_per_second"],
                             "target_ms_per_step": s["target_ms_per_step"], "acceptance_rate": s["acceptance_rate"],
                             "identical": r.token_ids == ref, "styled": any(m in r.text for m in STYLE_MARKERS),
                             "text": r.text})
                print(f"prompt {i} {name:14} {mode:11} {s['tokens_per_second'] or 0:6.1f} tok/s"
                      + (f" acceptance {s['acceptance_rate']:.2f}" if s["acceptance_rate"] is not None else ""),
                      file=sys.stderr, flush=True)
    rows = []
    for name in configs:
        for mode in ("target", "speculative"):
            sel = [r for r in runs if r["config"] == name and r["mode"] == mode]
            base = {r["prompt"]: r["tokens_per_second"] for r in runs if r["config"] == name and r["mode"] == "target"}
            med = lambda k: statistics.median(r[k] for r in sel if r[k] is not None) if any(  # noqa: E731
                r[k] is not None for r in sel) else None
            rows.append({"config": name, "mode": mode, "tokens_per_second": med("tokens_per_second"),
                         "speedup": statistics.median(r["tokens_per_second"] / base[r["prompt"]] for r in sel),
                         "target_ms_per_step": med("target_ms_per_step"), "acceptance_rate": med("acceptance_rate"),
                         "identical": sum(r["identical"] for r in sel), "styled": sum(r["styled"] for r in sel),
                         "n": len(sel)})
    print("two-row pass of the target (ms, median): " + ", ".join(f"{k} {v['median_ms']:.1f}" for k, v in steps.items()),
          file=sys.stderr)
    print(f"{'config':16} {'mode':12} {'tok/s':>6} {'speedup':>8} {'ms/step':>8} {'accept':>7} identical styled",
          file=sys.stderr)
    for r in rows:
        print(f"{r['config']:16} {r['mode']:12} {r['tokens_per_second']:6.1f} {r['speedup']:7.2f}x "
              f"{r['target_ms_per_step'] or 0:8.1f} {r['acceptance_rate'] or 0:7.2f} {r['identical']:>5}/{r['n']} "
              f"{r['styled']:>4}/{r['n']}", file=sys.stderr)
    print(json.dumps({"bundle": str(a.bundle), "plain": str(a.plain), "adapters": adapters, "threads": a.threads,
                      "max_new_tokens": a.max_new_tokens, "step_ms": steps, "summary": rows, "runs": runs}))


def step_times(configs: dict, reps: int) -> dict:
    """Median and p10 ms of the target's two-row pass (a decoding step) per configuration.

    Each configuration gets its own cache slot (a fork of its loaded graph, its adapter bound
    once), holding the same 40-token prefix; the passes rotate through the configurations.
    """
    sessions = {}
    for name, (llm, ad) in configs.items():
        s = llm.target.session.fork()
        adapter = llm.check_adapter(ad)
        s.set_adapter(ad, adapter.target if adapter else None)
        s.forward(np.arange(100, 140), 1)
        sessions[name] = s
    times: dict[str, list[float]] = {k: [] for k in sessions}
    names = list(sessions)
    for i in range(reps):
        k = i % len(names)
        for name in names[k:] + names[:k]:
            s = sessions[name]
            t0 = time.perf_counter()
            s.forward(np.array([5, 6]), 1)
            times[name].append(time.perf_counter() - t0)
            s.rollback(40)
    return {k: {"median_ms": 1e3 * statistics.median(v), "p10_ms": 1e3 * float(np.percentile(v, 10))}
            for k, v in times.items()}


if __name__ == "__main__":
    main()
