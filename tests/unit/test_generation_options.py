"""GenerationOptions: every choice about one generation in one frozen object that checks itself."""

from __future__ import annotations

import dataclasses

import pytest

from edgellm.errors import ConfigError
from edgellm.generation import GenerationOptions


def test_defaults_and_the_loop_config_they_make():
    o = GenerationOptions()
    cfg = o.decode_config(default_mode="target", default_max_new_tokens=77, eos_token_ids=[2], vocab_size=300)
    assert (cfg.mode, cfg.max_new_tokens, cfg.sampling.greedy, cfg.num_draft_tokens) == ("target", 77, True, None)
    assert cfg.eos_token_ids == (2,) and cfg.vocab_size == 300 and cfg.cache_prompt
    cfg = GenerationOptions(mode="lookup", max_new_tokens=5, temperature=0.5, top_k=3, seed=9).decode_config(
        default_mode="target", default_max_new_tokens=77)
    assert (cfg.mode, cfg.max_new_tokens, cfg.sampling.temperature, cfg.sampling.top_k, cfg.seed) == (
        "lookup", 5, 0.5, 3, 9)


def test_stop_is_normalized_and_the_object_is_frozen():
    assert GenerationOptions(stop="\n\n").stop == ("\n\n",)
    assert GenerationOptions(stop=["a", "b"]).stop == ("a", "b")
    assert GenerationOptions(stop=None).stop == ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        GenerationOptions().temperature = 1.0  # type: ignore[misc]


@pytest.mark.parametrize("fields, param", [
    ({"mode": "fast"}, "mode"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 2.5}, "max_new_tokens"),
    ({"temperature": -1}, "temperature"),
    ({"temperature": float("nan")}, "temperature"),
    ({"top_k": -3}, "top_k"),
    ({"top_p": 0}, "top_p"),
    ({"seed": -1}, "seed"),
    ({"seed": True}, "seed"),
    ({"num_draft_tokens": 65}, "num_draft_tokens"),
    ({"stop": [""]}, "stop"),
    ({"stop": [1]}, "stop"),
    ({"stop": ["\ud800"]}, "stop"),
    ({"adapter": 3}, "adapter"),
    ({"cache_prompt": "yes"}, "cache_prompt"),
    ({"prefill_chunk": 1}, "prefill_chunk"),
])
def test_each_bad_value_is_one_config_error_naming_it(fields, param):
    with pytest.raises(ConfigError) as e:
        GenerationOptions(**fields)
    assert e.value.param == param and "allowed" in str(e.value)


def test_of_replaces_fields_and_names_an_unknown_one():
    base = GenerationOptions(temperature=0.7, seed=1)
    assert GenerationOptions.of(base) is base
    assert GenerationOptions.of(base, seed=2) == GenerationOptions(temperature=0.7, seed=2)
    assert GenerationOptions.of(None, top_k=4) == GenerationOptions(top_k=4)
    with pytest.raises(ConfigError, match="unknown generation option 'temprature'; allowed: mode, max_new_tokens") as e:
        GenerationOptions.of(temprature=0.2)
    assert e.value.param == "temprature"
    with pytest.raises(ConfigError, match="allowed: a GenerationOptions or None"):
        GenerationOptions.of({"temperature": 0.2})  # type: ignore[arg-type]
