"""Model configs: each family's fields are read into what the builder implements; every field that
would change the math in a way the builder lacks is refused by name, never exported as a wrong graph."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.errors import ExportError
from edgellm.export.families import Rope, rope_inv_freq
from edgellm.export.source import spec_from_hf_config

BASE = {"model_type": "llama", "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 320}


def test_a_plain_llama_config_is_read():
    spec = spec_from_hf_config(dict(BASE, hidden_act="silu"), "m")
    assert spec.head_dim == 16 and spec.num_kv_heads == 2
    assert spec.features.plain and spec.features.windows == (-1, -1)


def test_family_fields_are_read():
    gemma3 = spec_from_hf_config(dict(BASE, model_type="gemma3_text", num_hidden_layers=3, sliding_window=8,
                                      layer_types=["sliding_attention", "sliding_attention", "full_attention"],
                                      query_pre_attn_scalar=64, rope_local_base_freq=50.0), "m").features
    assert gemma3.windows == (8, 8, -1) and gemma3.local_rope.theta == 50.0 and gemma3.attention_scale == 64 ** -0.5
    assert gemma3.activation == "gelu_tanh" and gemma3.family.norm_offset == 1.0 and not gemma3.plain
    # a config without layer_types gets transformers' default pattern (every 6th layer full)
    old = spec_from_hf_config(dict(BASE, model_type="gemma3_text", num_hidden_layers=7, sliding_window=8), "m")
    assert old.features.windows == (8, 8, 8, 8, 8, -1, 8)
    mistral = spec_from_hf_config(dict(BASE, model_type="mistral", sliding_window=4), "m").features
    assert mistral.windows == (4, 4)
    smol = spec_from_hf_config(dict(BASE, model_type="smollm3", no_rope_layers=[1, 0]), "m").features
    assert smol.rotary == (True, False)
    assert spec_from_hf_config(dict(BASE, hidden_act="gelu"), "m").features.activation == "gelu"


@pytest.mark.parametrize("extra,match", [
    ({"hidden_act": "relu2"}, "hidden_act 'relu2' is not supported; allowed: silu"),
    ({"partial_rotary_factor": 0.5}, "partial_rotary_factor 0.5 is not supported for llama"),
    ({"model_type": "phi3", "partial_rotary_factor": 0.25}, "needs a multiple of 16"),
    ({"rope_scaling": {"rope_type": "su", "factor": 8.0}}, "rope_scaling .* allowed rope_type"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "lacks 'low_freq_factor'"),
    ({"use_sliding_window": True}, "sliding-window attention is not part of this model type"),
    ({"model_type": "qwen3", "layer_types": ["sliding_attention"], "sliding_window": 4}, "layer_types"),
    ({"model_type": "gemma3_text", "use_bidirectional_attention": True}, "use_bidirectional_attention"),
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"head_dim": 24}, "head_dim=24"),
])
def test_what_the_builder_cannot_do_is_refused(extra, match):
    with pytest.raises((ExportError, ValueError), match=match):
        spec_from_hf_config(dict(BASE, **extra), "m")


def test_rope_scaling_frequencies():
    plain, _ = rope_inv_freq(Rope(10000.0, 16))
    np.testing.assert_allclose(plain, 1 / 10000.0 ** (np.arange(0, 16, 2) / 16))
    linear, att = rope_inv_freq(Rope(10000.0, 16, (("factor", 4.0), ("rope_type", "linear"))))
    np.testing.assert_allclose(linear, plain / 4)
    assert att == 1.0
    llama3, _ = rope_inv_freq(Rope(500000.0, 64, (("factor", 8.0), ("high_freq_factor", 4.0), ("low_freq_factor", 1.0),
                                                  ("original_max_position_embeddings", 64), ("rope_type", "llama3"))))
    base, _ = rope_inv_freq(Rope(500000.0, 64))
    assert llama3[0] == base[0] and np.isclose(llama3[-1], base[-1] / 8)  # high frequencies kept, low ones / factor
    yarn, att = rope_inv_freq(Rope(10000.0, 16, (("factor", 4.0), ("rope_type", "yarn")), 64))
    assert np.isclose(att, 0.1 * np.log(4.0) + 1) and yarn[0] == plain[0] and np.isclose(yarn[-1], plain[-1] / 4)
    short = (("long_factor", (2.0,) * 8), ("rope_type", "longrope"), ("short_factor", (1.0,) * 8))
    lr = Rope(10000.0, 16, short, 256, 64)
    (s, att), (lo, _) = rope_inv_freq(lr), rope_inv_freq(lr, long=True)
    np.testing.assert_allclose(s, plain)
    np.testing.assert_allclose(lo, plain / 2)
    assert np.isclose(att, np.sqrt(1 + np.log(4) / np.log(64))) and lr.switch_length() == 64
