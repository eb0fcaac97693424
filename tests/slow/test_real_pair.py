"""Real-model checks on the default pair (opt in: EDGELLM_SLOW=1; run by scripts/bench.sh)."""

from __future__ import annotations

import pytest

from helpers import slow_enabled
from edgellm.fetch import default_cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not slow_enabled(), reason="set EDGELLM_SLOW=1 (needs the real pair)")]

CODE_PROMPTS = [
    "def quicksort(arr):\n    \"\"\"Sort a list with quicksort.\"\"\"\n",
    "def binary_search(items, target):\n    \"\"\"Return the index of target in the sorted list items, or -1.\"\"\"\n",
]


@pytest.fixture(scope="module")
def llm():
    import edgellm
    from edgellm.demo import BUNDLE_NAME

    bundle = default_cache_dir() / "bundles" / BUNDLE_NAME
    if not (bundle / "manifest.json").is_file():
        pytest.skip(f"no bundle at {bundle}: run scripts/main.sh first")
    return edgellm.load(bundle)


@pytest.mark.parametrize("prompt", CODE_PROMPTS)
def test_speculative_and_lookup_equal_target_on_code(llm, prompt):
    ref = llm.generate(prompt, mode="target", max_new_tokens=64)
    for mode in ("speculative", "lookup"):
        assert llm.generate(prompt, mode=mode, max_new_tokens=64).token_ids == ref.token_ids, mode


def test_gguf_special_tokens_survive_conversion(llm):
    tok = llm.tokenizer
    for text in ("<|im_end|>", "<|fim_prefix|>", "<tool_call>"):
        assert len(tok.encode(text)) == 1, text
    assert 151645 in tok.eos_token_ids


def test_target_keeps_the_gguf_model_output(llm):
    """The target kept its GGUF blocks: greedy output follows the dequantized GGUF model run by
    transformers in fp32 (the re-quantized int4 target left it after 14 tokens on this prompt)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from edgellm.fetch import DEFAULT_TARGET

    assert llm.manifest.target.quantization["quant"] == "gguf"
    gguf = default_cache_dir() / "models" / DEFAULT_TARGET.filename
    model = transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name,
                                                              dtype=torch.float32).eval()
    ids = llm.prompt_ids(CODE_PROMPTS[0])
    with torch.inference_mode():
        ref = model.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
    got = llm.generate(CODE_PROMPTS[0], mode="target", max_new_tokens=48).token_ids
    assert got == ref[: len(got)]


def test_a_cached_chat_turn_equals_a_cold_one(llm):
    """Turn 2 of a chat reuses turn 1's cached keys and values; output and cache equal a cold run's."""
    import numpy as np

    msgs = [{"role": "user", "content": "Write a Python function that reverses a string."}]
    first = llm.generate(msgs, max_new_tokens=48, temperature=0.0)
    msgs += [{"role": "assistant", "content": first.text}, {"role": "user", "content": "Now without slicing."}]
    warm = llm.generate(msgs, max_new_tokens=48, temperature=0.0)
    n = warm.stats["prompt_tokens"] + len(warm.token_ids) - 1
    keep = [llm.target.session.cache_array(i)[:, :n].copy() for i in (0, 13, 27)]
    cold = llm.generate(msgs, max_new_tokens=48, temperature=0.0, cache_prompt=False)
    assert warm.stats["cached_tokens"] >= first.stats["prompt_tokens"] and cold.stats["cached_tokens"] == 0
    assert warm.token_ids == cold.token_ids
    for a, i in zip(keep, (0, 13, 27)):
        np.testing.assert_array_equal(a, llm.target.session.cache_array(i)[:, :n])


def test_batched_passes_give_each_request_its_solo_output(llm):
    """Four requests in flight on the real pair (speculative, lookup and target, greedy and seeded
    sampling), their target passes batched: each gets exactly what it gets alone."""
    import edgellm
    from helpers import run_concurrently

    if llm.manifest.target.batch_graph is None:
        pytest.skip("this bundle predates batch graphs: `edgellm add-batch-graph BUNDLE` or re-export")
    requests = [(CODE_PROMPTS[0], dict(mode="speculative", max_new_tokens=48)),
                (CODE_PROMPTS[1], dict(mode="lookup", max_new_tokens=48)),
                ("class Stack:\n    def __init__(self):", dict(mode="target", max_new_tokens=32)),
                ("import json\n\ndef load_config(path):", dict(mode="speculative", temperature=0.7, seed=5,
                                                              max_new_tokens=32))]
    solo = [llm.generate(p, cache_prompt=False, **kw).token_ids for p, kw in requests]
    batched = edgellm.load(llm.bundle, max_batch=4)
    assert run_concurrently(batched, [(p, kw | {"cache_prompt": False}) for p, kw in requests]) == solo
    assert batched.gate.parts_run > batched.gate.passes
