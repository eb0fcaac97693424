"""Prompt caching on a tiny exported bundle: warm turns equal cold runs bit for bit; the LRU swaps conversations."""

from __future__ import annotations

import numpy as np
import pytest

import edgellm


SYSTEM = {"role": "system", "content": "You write short Python."}


def chat(turns: list[str], answers: list[str]) -> list[dict[str, str]]:
    msgs = [SYSTEM]
    for i, t in enumerate(turns):
        msgs.append({"role": "user", "content": t})
        if i < len(answers):
            msgs.append({"role": "assistant", "content": answers[i]})
    return msgs


@pytest.fixture(scope="module")
def warm(tiny_bundle):
    return edgellm.load(tiny_bundle, threads=1, prompt_cache_bytes=64 * 2**20)


@pytest.fixture(scope="module")
def cold(tiny_bundle):
    return edgellm.load(tiny_bundle, threads=1)


def caches(llm, n: int) -> list[np.ndarray]:
    s = llm.target.session
    return [s.cache_array(i, kind)[:, :n] for i in range(2) for kind in ("key", "value")]


@pytest.mark.parametrize("mode, kw", [("target", {}), ("speculative", {}), ("lookup", {}),
                                      ("target", {"temperature": 0.8, "seed": 3}),
                                      ("speculative", {"temperature": 0.8, "seed": 3, "num_draft_tokens": 3})])
def test_each_turn_equals_a_cold_run(warm, cold, mode, kw):
    turns, answers = ["def foo(x):", "hello world", "return x + 1"], []
    for i in range(len(turns)):
        msgs = chat(turns[: i + 1], answers)
        w = warm.generate(msgs, mode=mode, max_new_tokens=12, **kw)
        c = cold.generate(msgs, mode=mode, max_new_tokens=12, cache_prompt=False, **kw)
        assert w.token_ids == c.token_ids and w.text == c.text, (mode, i)
        assert c.stats["cached_tokens"] == 0
        if i:  # turn 2 on: everything up to the new user message was cached
            assert w.stats["cached_tokens"] >= len(warm.prompt_ids(chat(turns[:i], answers[:i - 1]))) - 1
        n = w.stats["prompt_tokens"] + len(w.token_ids) - 1
        for a, b in zip(caches(warm, n), caches(cold, n)):  # the keys and values themselves, bit for bit
            np.testing.assert_array_equal(a, b)
        answers.append(w.text)


def test_conversations_swap_through_the_lru(tiny_bundle, cold):
    llm = edgellm.load(tiny_bundle, threads=1, prompt_cache_bytes=64 * 2**20)
    a1 = chat(["def foo(x): return x + 1 " * 3], [])
    b1 = chat(["hello world, héllo wörld " * 3], [])
    ra = llm.generate(a1, mode="target", max_new_tokens=8)
    llm.generate(b1, mode="target", max_new_tokens=8)  # overwrites A's live caches: A goes to the LRU
    assert len(llm.prompt_cache) == 1
    a2 = chat(["def foo(x): return x + 1 " * 3, "again"], [ra.text])
    r = llm.generate(a2, mode="speculative", max_new_tokens=8)
    assert r.stats["cached_tokens"] >= len(llm.prompt_ids(a1))  # A came back from the LRU, B went in
    assert r.token_ids == cold.generate(a2, mode="speculative", max_new_tokens=8, cache_prompt=False).token_ids
    assert len(llm.prompt_cache) == 1


def test_without_room_in_the_lru_a_swapped_out_conversation_starts_cold(tiny_bundle):
    llm = edgellm.load(tiny_bundle, threads=1, prompt_cache_bytes=1024)  # smaller than any entry
    a1 = chat(["def foo(x): return x + 1 " * 3], [])
    ra = llm.generate(a1, mode="target", max_new_tokens=8)
    b1 = chat(["hello world, héllo wörld " * 3], [])
    llm.generate(b1, mode="target", max_new_tokens=8)
    a2 = chat(["def foo(x): return x + 1 " * 3, "again"], [ra.text])
    r = llm.generate(a2, mode="target", max_new_tokens=8)
    assert len(llm.prompt_cache) == 0
    shared = next(i for i, (x, y) in enumerate(zip(llm.prompt_ids(a2), llm.prompt_ids(b1))) if x != y)
    assert r.stats["cached_tokens"] == shared  # the system prompt both conversations start with


def test_cache_prompt_must_be_a_bool(warm):
    with pytest.raises(edgellm.ConfigError, match="cache_prompt='yes'; allowed: true or false"):
        warm.generate("x", cache_prompt="yes")
