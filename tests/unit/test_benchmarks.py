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
