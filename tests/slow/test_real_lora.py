"""The reference pair with a real LoRA fine-tune (opt in: EDGELLM_SLOW=1; needs the bundle that
README "Fine-tunes" exports with benchmarks/train_lora.py's adapter)."""

from __future__ import annotations

import pytest

from helpers import slow_enabled
from edgellm.fetch import default_cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.skipif(not slow_enabled(), reason="set EDGELLM_SLOW=1 (needs the real pair)")]

BUNDLE = default_cache_dir() / "bundles" / "qwen-coder-lora"
ASK = [{"role": "user", "content": "Write a Python function that returns the last element of a list."}]


@pytest.fixture(scope="module")
def llm():
    import edgellm

    if not (BUNDLE / "manifest.json").is_file():
        pytest.skip(f"no LoRA bundle at {BUNDLE}: train and export it as README 'Fine-tunes' says")
    return edgellm.load(BUNDLE)


def test_the_adapter_changes_the_answer_and_speculation_stays_exact(llm):
    adapter = sorted(llm.adapters)[0]
    base = llm.generate(ASK, mode="target", max_new_tokens=48)
    tuned = llm.generate(ASK, mode="target", max_new_tokens=48, adapter=adapter)
    assert tuned.token_ids != base.token_ids
    for mode in ("speculative", "lookup"):
        assert llm.generate(ASK, mode=mode, max_new_tokens=48, adapter=adapter).token_ids == tuned.token_ids, mode
        assert llm.generate(ASK, mode=mode, max_new_tokens=48).token_ids == base.token_ids, mode
