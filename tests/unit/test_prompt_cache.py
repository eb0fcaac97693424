"""Prompt caching: prefix reuse in the decoding loop (fake models) and the byte-bounded LRU."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import FakeLM
from edgellm.errors import ConfigError
from edgellm.prompt_cache import Entry, PromptCache, Snapshot, common_prefix, parse_bytes
from edgellm.sampling import SamplingConfig
from edgellm.speculative import DecodeConfig, DecodeStats, decode

TURN1 = [5, 17, 3, 9, 22, 5, 17, 8, 1]


def run(target, prompt, draft=None, **kw):
    stats = DecodeStats()
    cfg = DecodeConfig(**{"max_new_tokens": 24, "vocab_size": target.vocab, **kw})
    tokens = [t for r in decode(target, prompt, cfg, draft=draft, stats=stats) for t in r.tokens]
    return tokens, stats


def test_common_prefix():
    a = np.array([1, 2, 3, 4])
    assert common_prefix(a, np.array([1, 2, 3, 4])) == 4
    assert common_prefix(a, np.array([1, 2, 9])) == 2
    assert common_prefix(a, np.array([1, 2])) == 2
    assert common_prefix(a, np.array([], np.int64)) == 0
    assert common_prefix(a, np.array([7])) == 0


@pytest.mark.parametrize("mode", ["target", "speculative", "lookup"])
def test_second_turn_prefills_only_its_new_tokens_and_matches_a_cold_run(mode):
    warm_t, warm_d = FakeLM(seed=1), FakeLM(seed=2)
    first, _ = run(warm_t, TURN1, warm_d, mode=mode)
    turn2 = TURN1 + first + [4, 4, 7]
    warm_t.calls.clear()
    warm, stats = run(warm_t, turn2, warm_d, mode=mode)
    cold, cold_stats = run(FakeLM(seed=1), turn2, FakeLM(seed=2), mode=mode)
    assert warm == cold
    # the target's cache held turn 1 and all of its answer but the last token
    assert stats.cached_tokens == len(TURN1) + len(first) - 1 and cold_stats.cached_tokens == 0
    assert warm_t.calls[0] == (stats.cached_tokens, len(turn2) - stats.cached_tokens)


def test_same_prompt_again_reruns_only_its_last_token():
    model = FakeLM(seed=3)
    first, _ = run(model, TURN1, mode="target")
    model.calls.clear()
    again, stats = run(model, TURN1, mode="target")
    assert again == first and stats.cached_tokens == len(TURN1) - 1
    assert model.calls[0] == (len(TURN1) - 1, 1)


def test_a_diverging_prompt_keeps_only_the_shared_part():
    model = FakeLM(seed=3)
    run(model, TURN1, mode="target")
    other = TURN1[:4] + [30, 31, 32]
    out, stats = run(model, other, mode="target")
    assert stats.cached_tokens == 4
    assert out == run(FakeLM(seed=3), other, mode="target")[0]


def test_cache_prompt_false_prefills_everything():
    model = FakeLM(seed=3)
    run(model, TURN1, mode="target")
    model.calls.clear()
    _, stats = run(model, TURN1, mode="target", cache_prompt=False)
    assert stats.cached_tokens == 0 and model.calls[0] == (0, len(TURN1))


def test_sampled_output_with_a_seed_matches_a_cold_run():
    kw = dict(mode="speculative", num_draft_tokens=3, seed=11, sampling=SamplingConfig(temperature=0.8))
    warm_t, warm_d = FakeLM(seed=1), FakeLM(seed=2)
    first, _ = run(warm_t, TURN1, warm_d, **kw)
    turn2 = TURN1 + first + [9]
    warm, stats = run(warm_t, turn2, warm_d, **kw)
    assert stats.cached_tokens > len(TURN1)
    assert warm == run(FakeLM(seed=1), turn2, FakeLM(seed=2), **kw)[0]


def _entry(n: int, start: int = 0, width: int = 10) -> Entry:
    ids = np.arange(start, start + n, dtype=np.int64)
    return Entry(Snapshot(ids, (np.zeros((1, n, width), np.float32),)), None)


def test_lru_evicts_the_least_recently_used_by_bytes():
    one = _entry(10).nbytes
    cache = PromptCache(3 * one)
    for start in (0, 100, 200):
        assert cache.store(_entry(10, start))
    assert len(cache) == 3 and cache.nbytes == 3 * one
    taken = cache.take_best(np.arange(100, 105), better_than=0)  # used: taken out
    assert taken is not None and taken.target.ids[0] == 100 and len(cache) == 2
    cache.store(taken)  # back as the most recent
    cache.store(_entry(10, 300))
    cache.store(_entry(10, 400))  # over the bound: the oldest (0, then 200) go first
    starts = sorted(int(e.target.ids[0]) for e in cache._entries.values())
    assert starts == [100, 300, 400] and cache.evictions == 2 and cache.nbytes <= cache.max_bytes


def test_lru_refuses_an_entry_larger_than_the_bound_and_keeps_the_rest():
    cache = PromptCache(_entry(10).nbytes)
    assert cache.store(_entry(10))
    assert not cache.store(_entry(11, 50))
    assert len(cache) == 1 and not PromptCache(0).store(_entry(1))


def test_take_best_needs_a_longer_prefix_than_the_live_one():
    cache = PromptCache(10**6)
    cache.store(_entry(8))
    assert cache.take_best(np.arange(20), better_than=8) is None and len(cache) == 1
    assert cache.take_best(np.arange(20), better_than=7) is not None and len(cache) == 0


@pytest.mark.parametrize("text,value", [("0", 0), ("1048576", 2**20), ("512M", 512 * 2**20), ("2G", 2 * 2**30),
                                        ("1.5k", 1536), ("64MiB", 64 * 2**20), (4096, 4096)])
def test_parse_bytes(text, value):
    assert parse_bytes(text) == value


@pytest.mark.parametrize("text", ["", "lots", "-5", "12X", "1e9"])
def test_parse_bytes_refuses(text):
    with pytest.raises(ConfigError, match="allowed: a byte count"):
        parse_bytes(text)
    with pytest.raises(ConfigError, match="prompt_cache_bytes=-1"):
        PromptCache(-1)


def test_prefill_in_chunks_yields_turns_and_keeps_the_output():
    prompt = list(range(3, 40))  # 37 tokens
    model = FakeLM(seed=4)
    cfg = DecodeConfig(mode="target", max_new_tokens=12, vocab_size=model.vocab, prefill_chunk=10)
    rounds = list(decode(model, prompt, cfg))
    assert [len(r.tokens) for r in rounds[:3]] == [0, 0, 0] and rounds[3].tokens  # 10 + 10 + 10, then 7
    assert model.calls[:4] == [(0, 10), (10, 10), (20, 10), (30, 7)]
    tokens = [t for r in rounds for t in r.tokens]
    assert tokens == run(FakeLM(seed=4), prompt, mode="target", max_new_tokens=12)[0]
    with pytest.raises(ConfigError, match="prefill_chunk=1; allowed: an integer >= 2"):
        DecodeConfig(prefill_chunk=1)


def test_storing_a_longer_turn_drops_the_earlier_turns_of_that_conversation():
    cache = PromptCache(10**6)
    cache.store(_entry(5))  # turn 1: ids 0..4
    cache.store(_entry(5, 100))  # another conversation
    cache.store(_entry(9))  # turn 2 of the first: ids 0..8, turn 1 is its prefix
    assert sorted((int(e.target.ids[0]), len(e.target.ids)) for e in cache._entries.values()) == [(0, 9), (100, 5)]
