"""Does the shared n-gram index pay? A repetitive agent workload and the chat prompts, with and without it.

    .venv/bin/python benchmarks/shared_lookup.py [BUNDLE] [--requests 8] [--mode speculative] [--max-new-tokens 96]

One loaded bundle; every request runs twice back to back, first without the shared index, then
with it (the index keeps every earlier request's prompt and output, as ``edgellm serve`` does).
The agent workload asks for the same JSON tool-call shape with different arguments; then the
chat prompts of ``benchmarks/prompts/chat.jsonl`` run the same way (the index now holds the
agent's requests too). Prompt caching is off for both runs (``cache_prompt=False``) so that only
the proposals differ. Reports decode tok/s of both, the tokens the index proposed and the target
accepted, and whether the outputs are identical (greedy). Human table on stderr, JSON last.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import edgellm  # noqa: E402
from edgellm.demo import BUNDLE_NAME  # noqa: E402
from edgellm.fetch import default_cache_dir  # noqa: E402
from edgellm.lookup import SharedLookup  # noqa: E402

HERE = Path(__file__).resolve().parent
DEFAULT_BUNDLE = default_cache_dir() / "bundles" / BUNDLE_NAME  # what scripts/main.sh exports
SYSTEM = ("You are an agent that calls tools. Answer with one JSON object and nothing else, of the form "
          '{"tool": "get_weather", "arguments": {"city": ..., "date": "YYYY-MM-DD", "unit": "celsius" or '
          '"fahrenheit", "hourly": true or false}}.')
ASKS = [("Paris", "2026-12-04", "celsius", "hourly"), ("Osaka", "2026-12-05", "celsius", "daily"),
        ("Denver", "2026-12-06", "fahrenheit", "hourly"), ("Nairobi", "2026-12-07", "celsius", "daily"),
        ("Lima", "2026-12-08", "celsius", "hourly"), ("Boston", "2026-12-09", "fahrenheit", "daily"),
        ("Oslo", "2026-12-10", "celsius", "hourly"), ("Perth", "2026-12-11", "celsius", "daily"),
        ("Austin", "2026-12-12", "fahrenheit", "hourly"), ("Cairo", "2026-12-13", "celsius", "daily")]


def agent_prompts(n: int) -> list[dict]:
    return [{"id": f"agent-{city.lower()}", "messages": [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": f"What will the weather be in {city} on {date}? Use {unit}; {kind} values please."}]}
        for city, date, unit, kind in ASKS[:n]]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("bundle", nargs="?", type=Path, default=DEFAULT_BUNDLE)
    ap.add_argument("--requests", type=int, default=8, choices=range(2, len(ASKS) + 1))
    ap.add_argument("--mode", default="speculative")
    ap.add_argument("--max-new-tokens", type=int, default=96)
    ap.add_argument("--threads", type=int, default=int(os.environ.get("EDGELLM_THREADS", "2")))
    a = ap.parse_args()
    llm = edgellm.load(a.bundle, threads=a.threads)
    on, off = SharedLookup(100_000), SharedLookup(0)
    llm.generate("def f(x):", max_new_tokens=4, mode=a.mode)  # warm-up
    chat = [json.loads(line) for line in (HERE / "prompts" / "chat.jsonl").read_text().splitlines() if line]
    rows = []
    for workload, prompts in (("agent", agent_prompts(a.requests)), ("chat", chat)):
        for p in prompts:
            res = {}
            for name, index in (("off", off), ("on", on)):
                llm.shared_lookup = index
                res[name] = llm.generate(p["messages"], mode=a.mode, max_new_tokens=a.max_new_tokens,
                                         cache_prompt=False)
            shared = res["on"].stats["proposals_by_source"].get("shared", {})
            rows.append({"workload": workload, "prompt": p["id"], "tokens": len(res["on"].token_ids),
                         "tokens_per_second_off": res["off"].stats["tokens_per_second"],
                         "tokens_per_second_on": res["on"].stats["tokens_per_second"],
                         "shared_proposed": shared.get("proposed", 0), "shared_accepted": shared.get("accepted", 0),
                         "identical": res["on"].token_ids == res["off"].token_ids})
            r = rows[-1]
            print(f"{workload:5} {r['prompt']:16} {r['tokens']:3d} tokens: {r['tokens_per_second_off']:5.1f} -> "
                  f"{r['tokens_per_second_on']:5.1f} tok/s; shared proposals {r['shared_accepted']}/"
                  f"{r['shared_proposed']} accepted; identical: {r['identical']}", file=sys.stderr)
    summary = {}
    for w in ("agent", "chat"):
        rs = [r for r in rows if r["workload"] == w]
        later = rs[1:] if w == "agent" else rs  # the first agent request has nothing to look up yet
        summary[w] = {"median_ratio_on_over_off": statistics.median(r["tokens_per_second_on"] / r["tokens_per_second_off"]
                                                                     for r in later),
                      "all_identical": all(r["identical"] for r in rs)}
        print(f"{w}: with the shared index {summary[w]['median_ratio_on_over_off']:.2f}x the speed without "
              f"(median{' from the second request on' if w == 'agent' else ''}); identical: "
              f"{summary[w]['all_identical']}", file=sys.stderr)
    print(json.dumps({"bundle": a.bundle.name, "mode": a.mode, "threads": a.threads,
                      "max_new_tokens": a.max_new_tokens, "summary": summary, "requests": rows}))


if __name__ == "__main__":
    main()
