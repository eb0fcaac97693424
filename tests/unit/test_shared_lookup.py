"""The shared n-gram index: what it proposes, its memory bound, and exact output through the loop."""

from __future__ import annotations

import pytest

from helpers import FakeLM, greedy_reference
from edgellm.errors import ConfigError
from edgellm.lookup import SharedLookup
from edgellm.speculative import DecodeConfig, DecodeStats, decode


def test_proposes_what_followed_the_longest_suffix_last_seen():
    idx = SharedLookup(1000)
    idx.add([1, 2, 3, 4, 5, 6])
    idx.add([9, 3, 4, 7, 8])
    assert idx.propose([0, 3, 4], 3) == [7, 8]  # the most recent occurrence of (3, 4)
    assert idx.propose([2, 3, 4], 3) == [5, 6]  # the longer suffix (2, 3, 4) wins
    assert idx.propose([0, 1], 2) == []  # a 1-gram is too short
    assert idx.propose([5, 6], 2) == []  # nothing ever followed it
    assert idx.propose([1, 2], 0) == []


def test_memory_bound_drops_the_oldest_sequences_and_their_ngrams():
    idx = SharedLookup(12)
    idx.add([1, 2, 3, 4, 5, 6])
    idx.add([7, 8, 9, 10, 11, 12])
    assert idx.tokens == 12 and idx.propose([1, 2], 2) == [3, 4]
    idx.add([20, 21, 22, 23])
    assert idx.tokens == 4 + 6 and idx.propose([1, 2], 2) == []  # the first sequence is gone
    assert all(key in idx._seqs for key, _ in idx._index.values())  # no n-gram points at it
    assert idx.propose([8, 9], 2) == [10, 11]


def test_off_and_bad_sizes():
    idx = SharedLookup(0)
    idx.add([1, 2, 3, 4])
    assert idx.propose([1, 2], 2) == [] and idx.tokens == 0
    with pytest.raises(ConfigError, match="shared_lookup_tokens=-3"):
        SharedLookup(-3)


PROMPT = [5, 17, 3, 9, 22, 5, 17]


@pytest.mark.parametrize("mode", ["target", "lookup", "speculative"])
def test_output_is_unchanged_and_a_repeated_request_takes_shared_proposals(mode):
    target = FakeLM(seed=1)
    ref = greedy_reference(target, PROMPT, 30)
    idx = SharedLookup(10_000)
    idx.add(PROMPT + ref)  # an earlier request with the same answer
    stats = DecodeStats()
    cfg = DecodeConfig(mode=mode, max_new_tokens=30, vocab_size=target.vocab)
    out = [t for r in decode(target, [1, 2] + PROMPT, cfg, draft=FakeLM(seed=2), stats=stats, shared=idx)
           for t in r.tokens]
    assert out == greedy_reference(FakeLM(seed=1), [1, 2] + PROMPT, 30)
    if mode != "speculative":  # (speculative may prefer its draft; lookup and target have no other source)
        assert stats.by_source["shared"][1] > 0
