"""Time to first token of each turn of a chat, with and without the prompt cache, in one run.

    .venv/bin/python benchmarks/chat_turns.py [BUNDLE] [--turns 6] [--max-new-tokens 96] [--mode speculative]

One loaded bundle plays a code conversation of ``--turns`` user messages. Every turn runs twice,
back to back: first reusing what the caches hold (``cache_prompt=True``, the server's default:
the previous turn's prompt and answer), then cold (``cache_prompt=False``: the whole conversation
prefilled again, what every request cost before). Both must give the same text (greedy); the
warm answer goes into the history. Human table on stderr, JSON as the last stdout line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgellm  # noqa: E402
from edgellm.demo import BUNDLE_NAME  # noqa: E402
from edgellm.fetch import default_cache_dir  # noqa: E402

DEFAULT_BUNDLE = default_cache_dir() / "bundles" / BUNDLE_NAME  # what scripts/main.sh exports
SYSTEM = "You are a helpful coding assistant. Answer with short Python code and one sentence."
TURNS = [
    "Write a function that parses a CSV line into a list of fields, handling quoted fields.",
    "Now make it accept a custom delimiter.",
    "Add type hints and a docstring.",
    "Write three pytest tests for it.",
    "What happens with an unterminated quote? Make it raise ValueError.",
    "Rewrite the tests to cover that case too.",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--turns", type=int, default=6, choices=range(1, len(TURNS) + 1))
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--mode", default="speculative")
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDGELLM_THREADS", "2")))
    a = ap.parse_args()
    llm = edgellm.load(a.bundle, threads=a.threads)
    llm.generate("def f(x):", max_new_tokens=4, mode=a.mode)  # warm-up
    messages = [{"role": "system", "content": SYSTEM}]
    rows = []
    for i, turn in enumerate(TURNS[: a.turns]):
        messages.append({"role": "user", "content": turn})
        warm = llm.generate(messages, mode=a.mode, max_new_tokens=a.max_new_tokens)
        cold = llm.generate(messages, mode=a.mode, max_new_tokens=a.max_new_tokens, cache_prompt=False)
        w, c = warm.stats, cold.stats
        rows.append({"turn": i + 1, "prompt_tokens": w["prompt_tokens"], "cached_tokens": w["cached_tokens"],
                     "ttft_cold_s": c["time_to_first_token_s"], "ttft_cached_s": w["time_to_first_token_s"],
                     "ttft_ratio": c["time_to_first_token_s"] / w["time_to_first_token_s"],
                     "tokens_per_second_cold": c["tokens_per_second"],
                     "tokens_per_second_cached": w["tokens_per_second"],
                     "identical": warm.token_ids == cold.token_ids})
        messages.append({"role": "assistant", "content": warm.text})
        r = rows[-1]
        print(f"turn {r['turn']}: {r['prompt_tokens']:5d} prompt tokens, {r['cached_tokens']:5d} cached; first token "
              f"{r['ttft_cold_s']:.2f} s cold, {r['ttft_cached_s']:.2f} s cached ({r['ttft_ratio']:.1f}x); "
              f"identical: {r['identical']}", file=sys.stderr)
    print(json.dumps({"bundle": a.bundle.name, "mode": a.mode, "threads": a.threads,
                      "max_new_tokens": a.max_new_tokens, "turns": rows}))


if __name__ == "__main__":
    main()
