"""Test fixtures. Shared helpers are in helpers.py (a fake LM, tiny transformers models) and
tiny.py (a tiny model folder built without torch)."""

from __future__ import annotations

import pytest

from helpers import FakeLM


@pytest.fixture
def fake_lm():
    return FakeLM


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A random 2-layer Qwen2 folder built without torch (see tests/tiny.py)."""
    from tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny_qwen2"))


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_model_dir):
    """A bundle whose draft is the target itself (int4 target, int4 draft): must accept everything."""
    from edgellm.export import export

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    return export(tiny_model_dir, draft=tiny_model_dir, output=out, max_context=256, draft_quant="int4",
                  draft_block_size=32, lm_head_quant="int4")
