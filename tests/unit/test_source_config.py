"""Model configs the graph builder does not implement are refused by name, never exported as a wrong graph."""

from __future__ import annotations

import pytest

from edgellm.errors import ExportError
from edgellm.export.source import spec_from_hf_config

BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320}


def test_a_plain_llama_config_is_read():
    spec = spec_from_hf_config(dict(BASE, hidden_act="silu"), "m")
    assert spec.head_dim == 16 and spec.num_kv_heads == 2


@pytest.mark.parametrize("extra,match", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported; allowed: silu"),
    ({"hidden_act": "gelu_pytorch_tanh"}, "hidden_act 'gelu_pytorch_tanh'"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
    ({"use_sliding_window": True}, "sliding-window"),
])
def test_what_the_builder_cannot_do_is_refused(extra, match):
    with pytest.raises(ExportError, match=match):
        spec_from_hf_config(dict(BASE, **extra), "m")
