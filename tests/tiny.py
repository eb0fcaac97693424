"""A tiny random Qwen2 model folder built with numpy, safetensors and tokenizers only (no torch).

What the runtime tests export their bundles from, so they run in the install the runtime is for
(``.ci/run`` runs them in a virtual environment without torch). transformers reads the folder like
any checkpoint: the tests that compare with it load it there.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                 "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def train_tokenizer():
    """A small byte-level BPE tokenizer (300 tokens) trained on code and accented text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIAL,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["def foo(x): return x + 1\n" * 50, "hello world, héllo wörld 😀 " * 30], trainer)
    return tok


def save_tokenizer(folder: Path, tok=None) -> None:
    """``tokenizer.json`` and a ``tokenizer_config.json`` transformers' AutoTokenizer reads (eos, chat template)."""
    tok = tok or train_tokenizer()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": "<|im_end|>", "chat_template": CHAT_TEMPLATE,
        "model_max_length": 512}))
    (folder / "special_tokens_map.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))


def make_tiny_model(folder: Path, seed: int = 0, vocab_size: int = 320) -> Path:
    """A random 2-layer Qwen2 (hidden 64, 4 heads, 2 kv heads, tied embedding) saved in ``folder``.

    Weights as transformers initializes them (normal, std 0.02; zero biases; unit norms), the tied
    embedding then scaled by 8 for sharper next-token distributions (greedy text less flat).
    """
    from safetensors.numpy import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    hidden, inter, heads, kv, layers, head_dim = 64, 96, 4, 2, 2, 16
    w = lambda *shape: rng.normal(0, 0.02, shape).astype(np.float32)  # noqa: E731
    t = {"model.embed_tokens.weight": w(vocab_size, hidden) * 8, "model.norm.weight": np.ones(hidden, np.float32)}
    for i in range(layers):
        p = f"model.layers.{i}."
        t |= {p + "input_layernorm.weight": np.ones(hidden, np.float32),
              p + "post_attention_layernorm.weight": np.ones(hidden, np.float32),
              p + "self_attn.q_proj.weight": w(heads * head_dim, hidden),
              p + "self_attn.q_proj.bias": np.zeros(heads * head_dim, np.float32),
              p + "self_attn.k_proj.weight": w(kv * head_dim, hidden),
              p + "self_attn.k_proj.bias": np.zeros(kv * head_dim, np.float32),
              p + "self_attn.v_proj.weight": w(kv * head_dim, hidden),
              p + "self_attn.v_proj.bias": np.zeros(kv * head_dim, np.float32),
              p + "self_attn.o_proj.weight": w(hidden, heads * head_dim),
              p + "mlp.gate_proj.weight": w(inter, hidden), p + "mlp.up_proj.weight": w(inter, hidden),
              p + "mlp.down_proj.weight": w(hidden, inter)}
    save_file(t, str(folder / "model.safetensors"), metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps({
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "vocab_size": vocab_size,
        "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
        "num_attention_heads": heads, "num_key_value_heads": kv, "max_position_embeddings": 512,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": True, "hidden_act": "silu",
        "eos_token_id": 2, "use_sliding_window": False, "torch_dtype": "float32"}))
    save_tokenizer(folder)
    return folder
