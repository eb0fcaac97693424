"""onnxruntime's thread pools for draft and target: edgellm's policy against two others.

    .venv/bin/python benchmarks/thread_pools.py BUNDLE [--rounds 2] [--prompts 4] [--max-new-tokens 128]

Three policies, each in a process of its own (onnxruntime's process-wide pool is made once):

- ``session``: edgellm's (``runtimes/graphs.py``): a pool per session whose workers spin while
  its pass runs and sleep when it returns (``session.force_spinning_stop``);
- ``no-spin``: a pool per session that never spins, edgellm's policy before 2026-12-04;
- ``shared``: onnxruntime's process-wide pool (``set_global_thread_pool_sizes``), one for draft
  and target, its workers spinning between passes. Not offered by edgellm: once made, onnxruntime
  refuses every other session of the process that asks for a pool of its own.

The child process switches policy by wrapping ``onnxruntime.SessionOptions`` before loading.
Every round runs the three in turn (rotating which goes first), each generating the first
``--prompts`` code prompts of ``benchmarks/prompts/code.jsonl`` in target, speculative and lookup
mode, greedy, 2 threads. Medians of decode tokens/s per policy and mode over rounds and prompts;
every policy's tokens must equal the others'. The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
POLICIES = ("shared", "session", "no-spin")
MODES = ("target", "speculative", "lookup")


def child(bundle: str, policy: str, prompts: int, max_new_tokens: int) -> dict:
    """Generate in this process under ``policy``; returns tokens/s and token ids per mode."""
    import onnxruntime as ort

    base = ort.SessionOptions
    if policy == "shared":
        ort.set_global_thread_pool_sizes(2, 1)

    class Policy(base):  # edgellm's options, rewritten for the policy measured
        def __init__(self):
            super().__init__()
            if policy == "shared":
                self.use_per_session_threads = False

        def add_session_config_entry(self, key, value):
            if policy != "session" and key in ("session.force_spinning_stop", "session.intra_op.allow_spinning"):
                value = "0"
            return super().add_session_config_entry(key, value)

    if policy != "session":
        ort.SessionOptions = Policy
        if policy == "shared":  # its size is the process pool's; a per-session size is refused
            Policy.intra_op_num_threads = property(lambda self: 0, lambda self, n: None)
    import edgellm

    llm = edgellm.load(bundle, threads=2)
    texts = [json.loads(line)["prompt"] for line in (ROOT / "benchmarks/prompts/code.jsonl").read_text().splitlines()
             if line.strip()][:prompts]
    llm.generate(texts[0], mode="speculative", max_new_tokens=8, temperature=0)  # warm-up
    out: dict = {m: {"tokens_per_second": [], "token_ids": []} for m in MODES}
    for text in texts:
        for mode in MODES:
            r = llm.generate(text, mode=mode, max_new_tokens=max_new_tokens, temperature=0, cache_prompt=False)
            out[mode]["tokens_per_second"].append(r.stats["tokens_per_second"])
            out[mode]["token_ids"].append(r.token_ids)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--child", choices=POLICIES, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        print(json.dumps(child(a.bundle, a.child, a.prompts, a.max_new_tokens)))
        return
    runs: dict[str, list[dict]] = {p: [] for p in POLICIES}
    for r in range(a.rounds):
        order = POLICIES[r % 3:] + POLICIES[:r % 3]
        for policy in order:
            done = subprocess.run([sys.executable, __file__, a.bundle, "--child", policy, "--prompts", str(a.prompts),
                                   "--max-new-tokens", str(a.max_new_tokens)], capture_output=True, text=True, check=True)
            runs[policy].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(f"round {r + 1}/{a.rounds} {policy}: " + ", ".join(
                f"{m} {statistics.median(runs[policy][-1][m]['tokens_per_second']):.1f}" for m in MODES), file=sys.stderr)
    ids = {p: [run[m]["token_ids"] for run in runs[p] for m in MODES] for p in POLICIES}
    median = {p: {m: statistics.median(t for run in runs[p] for t in run[m]["tokens_per_second"]) for m in MODES}
              for p in POLICIES}
    print(f"{'tok/s, medians':16}" + "".join(f"{m:>13}" for m in MODES), file=sys.stderr)
    for p in POLICIES:
        print(f"{p:16}" + "".join(f"{median[p][m]:13.1f}" for m in MODES), file=sys.stderr)
    print(json.dumps({"bundle": Path(a.bundle).name, "rounds": a.rounds, "prompts": a.prompts,
                      "max_new_tokens": a.max_new_tokens, "threads": 2, "tokens_per_second": median,
                      "shared_over_no_spin": {m: median["shared"][m] / median["no-spin"][m] for m in MODES},
                      "session_over_no_spin": {m: median["session"][m] / median["no-spin"][m] for m in MODES},
                      "identical_tokens": ids["shared"] == ids["session"] == ids["no-spin"],
                      "runs": runs}))


if __name__ == "__main__":
    main()
