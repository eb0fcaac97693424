"""Several sequences in flight on one loaded bundle: each in its own cache slot, rounds interleaved."""

from __future__ import annotations

import itertools

import pytest

import edgellm
from helpers import MIXED_REQUESTS


REQUESTS = MIXED_REQUESTS


@pytest.fixture(scope="module")
def batched(tiny_bundle):
    return edgellm.load(tiny_bundle, threads=1, max_batch=3)


def solo(tiny_bundle):
    llm = edgellm.load(tiny_bundle, threads=1)
    return [llm.generate(p, **kw).token_ids for p, kw in REQUESTS]


def test_interleaved_sequences_each_get_their_solo_output(tiny_bundle, batched):
    """Up to 3 in flight; a finished one leaves and the next joins its slot mid-way through the others."""
    expected = solo(tiny_bundle)
    waiting = list(enumerate(REQUESTS))
    active: dict[int, tuple[int, object, list[int]]] = {}  # slot -> (request, its events, its tokens)
    got: dict[int, list[int]] = {}
    joined_late = False
    for turn in itertools.count():
        for slot in range(3):
            if slot not in active and waiting:
                i, (prompt, kw) = waiting.pop(0)
                joined_late |= turn > 0
                active[slot] = (i, batched.stream_events(prompt, slot=slot, **kw), [])
        if not active:
            break
        for slot, (i, events, tokens) in list(active.items()):
            for ev in events:  # one round
                tokens.extend(ev.token_ids)
                if ev.result is not None:
                    got[i] = tokens
                    del active[slot]
                    break
                if ev.round_end:
                    break
    assert joined_late
    assert [got[i] for i in range(len(REQUESTS))] == expected


def test_slots_share_the_weights_but_not_the_caches(batched):
    t0, t1 = batched.slots[0].target.session, batched.slots[1].target.session
    assert t0.session is t1.session and t0._cache[0] is not t1._cache[0]
    batched.generate("def foo(x): return", slot=1, max_new_tokens=5)
    n = t1.length
    batched.generate("hello world", slot=0, max_new_tokens=5)
    assert t1.length == n  # slot 0's generation left slot 1 alone
    assert batched.pick_slot(batched.prompt_ids("def foo(x): return 1"), [0, 1, 2]) == 1


def test_bad_slots_and_batch_sizes(tiny_bundle, batched):
    with pytest.raises(edgellm.ConfigError, match="slot=3; allowed: 0-2"):
        batched.generate("x", slot=3)
    with pytest.raises(edgellm.ConfigError, match="max_batch=0; allowed: an integer 1-64"):
        edgellm.load(tiny_bundle, max_batch=0)


def test_chunked_prefill_gives_turns_and_the_same_output(batched):
    prompt = "def foo(x): return x + 1\n" * 6
    n = len(batched.prompt_ids(prompt))
    events = list(batched.stream_events(prompt, slot=2, prefill_chunk=16, max_new_tokens=10, cache_prompt=False))
    ticks = [e for e in events if e.round_end and not e.token_ids and e.result is None]
    assert len(ticks) == (n - 1) // 16
    plain = batched.generate(prompt, slot=2, max_new_tokens=10, cache_prompt=False)
    assert events[-1].result.token_ids == plain.token_ids
