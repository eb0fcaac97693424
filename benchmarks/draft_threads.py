"""Speculative decoding with the draft session at 1 intra-op thread against 2 (the target at 2).

    .venv/bin/python benchmarks/draft_threads.py BUNDLE

The built-in bench prompts, 96 new tokens, 3 repeats, the two loaded bundles alternating which
goes first; medians of tokens/s and of the draft's ms per proposed token. The last stdout line is
one JSON document.
"""
import json
import statistics
import sys
from importlib import resources
import edgellm
from edgellm.api import Slot, _Bound, _session
from edgellm.runtimes.providers import resolve_provider

B = sys.argv[1]
prompts = [json.loads(l) for l in resources.files("edgellm").joinpath("data/bench_prompts.jsonl").read_text().splitlines() if l.strip()]
llms = {}
for dt in (2, 1):
    llm = edgellm.load(B, threads=2)
    if dt != 2:
        llm.draft = _Bound(_session(llm.bundle, llm.manifest.draft, "onnx", resolve_provider("cpu"), dt), llm.manifest.draft)
        llm.slots[0] = Slot(llm.target, llm.draft)
    llms[dt] = llm
res = {2: [], 1: []}
draft_ms = {2: [], 1: []}
for rep in range(3):
    for i, pr in enumerate(prompts):
        order = (2, 1) if (rep + i) % 2 == 0 else (1, 2)
        for dt in order:
            r = llms[dt].generate(pr.get("prompt") or pr["messages"], mode="speculative", max_new_tokens=96, cache_prompt=False)
            res[dt].append(r.stats["tokens_per_second"]); draft_ms[dt].append(r.stats["draft_ms_per_round"] / max(r.stats["mean_gamma"] or 1, 1e-9))
            print(rep, i, dt, round(r.stats["tokens_per_second"], 2), round(r.stats["acceptance_rate"] or 0, 2), flush=True)
print(json.dumps({f"draft_threads_{k}": {"median_tok_s": statistics.median(v), "median_draft_ms_per_token": statistics.median(draft_ms[k])} for k, v in res.items()}))
