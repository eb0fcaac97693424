"""One bundle on one execution provider: target alone vs speculative, with and without the draft's step graph.

For the provider matrix in the README (npu and gpu bundles on the CPU EP, OpenVINO, QNN):

    .venv/bin/python benchmarks/providers.py BUNDLE [--provider cpu] [--draft-provider P]
        [--max-new-tokens 64] [--save-tokens F.json | --compare-tokens F.json]

Each of three prompts is decoded greedily in target mode, speculatively, and (npu bundles)
speculatively with the draft's one-token step graph switched off; ``identical`` says whether
speculative output equals target output, ``equals_reference`` whether the target's tokens equal
those saved by an earlier run (e.g. on the CPU EP). The last stdout line is one JSON document.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import edgellm

PROMPTS = [
    "def quicksort(arr):\n    \"\"\"Sort a list with quicksort.\"\"\"\n",
    "Write a Python function that checks whether a string is a palindrome.",
    "class Stack:\n    def __init__(self):\n",
]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("bundle")
    ap.add_argument("--provider", default="cpu")
    ap.add_argument("--draft-provider", default=None)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--save-tokens", help="write the target's tokens per prompt here (a reference)")
    ap.add_argument("--compare-tokens", help="compare the target's tokens with a saved reference")
    a = ap.parse_args()

    t0 = time.perf_counter()
    llm = edgellm.load(a.bundle, provider=a.provider, draft_provider=a.draft_provider, threads=a.threads,
                       verify=False)
    result = {"bundle": a.bundle, "provider": a.provider, "draft_provider": a.draft_provider or a.provider,
              "load_s": round(time.perf_counter() - t0, 1), "max_new_tokens": a.max_new_tokens, "runs": []}
    reference = json.load(open(a.compare_tokens)) if a.compare_tokens else None
    tokens = []
    step_session = getattr(llm.draft.session, "step_session", None) if llm.draft else None
    for i, prompt in enumerate(PROMPTS):
        target = llm.generate(prompt, mode="target", max_new_tokens=a.max_new_tokens)
        spec = llm.generate(prompt, mode="speculative", max_new_tokens=a.max_new_tokens)
        run = {"target_tps": target.stats["tokens_per_second"], "speculative_tps": spec.stats["tokens_per_second"],
               "acceptance": spec.stats["acceptance_rate"], "identical": spec.token_ids == target.token_ids}
        if step_session is not None:  # the same, proposing through the padded window graph
            llm.draft.session.step_session = None
            windowed = llm.generate(prompt, mode="speculative", max_new_tokens=a.max_new_tokens)
            llm.draft.session.step_session = step_session
            run["speculative_tps_without_step_graph"] = windowed.stats["tokens_per_second"]
            run["identical_without_step_graph"] = windowed.token_ids == target.token_ids
        if reference is not None:
            run["equals_reference"] = target.token_ids == reference[i]
        tokens.append(target.token_ids)
        result["runs"].append(run)
        print(json.dumps(run), flush=True)
    if a.save_tokens:
        json.dump(tokens, open(a.save_tokens, "w"))
    for key in ("target_tps", "speculative_tps", "speculative_tps_without_step_graph"):
        values = [r[key] for r in result["runs"] if r.get(key) is not None]
        if values:
            result[key + "_median"] = statistics.median(values)
    result["speedup_median"] = result["speculative_tps_median"] / result["target_tps_median"]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
