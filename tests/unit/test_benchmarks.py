"""The comparison's bookkeeping (benchmarks/compare.py): what counts as the same output, and each engine's best mode."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))

from compare import best_modes, same_output  # noqa: E402


def test_same_output_is_exact_unless_the_text_was_retokenized():
    assert same_output([1, 2, 3], [1, 2, 3]) and not same_output([1, 2, 3], [1, 2, 4])
    assert not same_output([1, 2], None)
    # llama.cpp's text, re-tokenized: the last token of the shorter output and one token of length may differ
    assert same_output([1, 2, 3, 9], [1, 2, 3, 4, 5], retokenized=True)
    assert not same_output([1, 7, 3, 4], [1, 2, 3, 4], retokenized=True)
    assert not same_output([1, 2], [1, 2, 3, 4], retokenized=True)


def test_best_modes_ignore_peer_modes_that_change_the_output():
    row = lambda e, m, tps, same=1.0: {"engine": e, "mode": m, "category": "code", "decode_tps": tps,  # noqa: E731
                                       "equals_own_target": same}
    table = [row("edgellm", "target", 10), row("edgellm", "speculative", 30),
             row("llama.cpp", "target", 20), row("llama.cpp", "lookup", 40, same=0.5),
             row("genai", "ngram", 24), row("edgellm int4", "target", 15), row("edgellm int4", "lookup", 50, same=0.75)]
    best = {r["engine"]: r for r in best_modes(table)}
    assert best["llama.cpp"]["best_mode"] == "target" and best["edgellm"]["best_mode"] == "speculative"
    assert best["edgellm"]["over_peers"] == {"llama.cpp": 1.5, "genai": 1.25}
    assert best["edgellm int4"]["best_mode"] == "target"  # its faster lookup changed an output: a bug, not a best


def test_load_schedule_and_summary():
    from load import schedule, summarize

    prompts = [{"id": f"p{i}"} for i in range(5)]
    plan = schedule(prompts, 2, 3)
    assert [[p["id"] for p in c] for c in plan] == [["p0", "p2", "p4"], ["p1", "p3", "p0"]]
    ok = lambda p, text, tokens=10, ttft=1.0, lat=2.0: {"prompt": p, "text": text, "tokens": tokens,  # noqa: E731
                                                         "ttft_s": ttft, "latency_s": lat}
    results = [[ok("p0", "a"), ok("p2", "b", ttft=3.0)], [ok("p1", "X"), {"prompt": "p3", "error": "HTTP 500"}]]
    s = summarize(results, wall=4.0, reference={"p0": "a", "p1": "c"})
    assert s["requests"] == 3 and s["errors"] == 1 and s["error_messages"] == ["HTTP 500"]
    assert s["aggregate_tokens_per_second"] == 30 / 4.0 and s["per_client_tokens_per_second"] == [5.0, 5.0]
    assert s["identical_to_one_client"] is False and s["compared"] == 2  # p1 differs; p2 has no reference
    assert s["ttft_p50_s"] == 1.0 and s["latency_p95_s"] == 2.0


def test_draft_depth_keeps_and_renumbers_blocks():
    import dataclasses

    import pytest
    from draft_depth import parse_keep
    from draft_vocab import LayerSubset

    assert parse_keep("all", 24) is None
    assert parse_keep("0-2,5,7-8", 24) == [0, 1, 2, 5, 7, 8]
    for bad in ("0-24", "3-1,0", "x", "1,1", "0-5,3-8", "4,2"):
        with pytest.raises(SystemExit, match="allowed"):
            parse_keep(bad, 24)

    @dataclasses.dataclass(frozen=True)
    class Spec:
        num_layers: int

    class Src:
        spec, kind = Spec(6), "fake"

        def tensor(self, name):
            return name

        def has(self, name):
            return name != "model.layers.4.mlp.up_proj.weight"

        def native(self, name):
            return None

    sub = LayerSubset(Src(), [0, 1, 4, 5])
    assert sub.spec.num_layers == 4 and sub.kind == "fake"
    assert sub.tensor("model.layers.2.self_attn.q_proj.weight") == "model.layers.4.self_attn.q_proj.weight"
    assert sub.tensor("model.layers.3.mlp.down_proj.weight") == "model.layers.5.mlp.down_proj.weight"
    assert sub.tensor("model.norm.weight") == "model.norm.weight"  # outside the blocks: unchanged
    assert not sub.has("model.layers.2.mlp.up_proj.weight") and sub.has("model.layers.1.mlp.up_proj.weight")
    with pytest.raises(SystemExit, match="allowed"):
        LayerSubset(Src(), [0, 6])
