"""A tiny random Qwen2 model written as a GGUF file, with real quantized blocks of many types."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

# One GGUF type per linear weight, so every decoder and the fusion of mixed types are exercised:
# layer 0 mixes Q4_K and Q6_K inside QKV (two MatMulNBits, concatenated).
LAYER_TYPES = [
    {"attn_q": "Q4_K", "attn_k": "Q4_K", "attn_v": "Q6_K", "attn_output": "Q5_K",
     "ffn_gate": "Q4_K", "ffn_up": "Q4_K", "ffn_down": "Q6_K"},
    {"attn_q": "Q8_0", "attn_k": "Q8_0", "attn_v": "Q8_0", "attn_output": "Q4_0",
     "ffn_gate": "Q5_0", "ffn_up": "Q5_0", "ffn_down": "Q4_1"},
]
HIDDEN, INTER, HEADS, KV_HEADS = 256, 512, 4, 2
PHI3_ROTARY = 32  # of a head's 64 dimensions (GroupQueryAttention needs a multiple of 16)
#: the special tokens transformers' Phi-3 GGUF tokenizer converter adds; a Phi-3 vocabulary has them
PHI3_SPECIAL = ["</s>", "<|endoftext|>", "<|assistant|>"] + [f"<|placeholder{i}|>" for i in range(1, 7)] + [
    "<|system|>", "<|end|>", "<|user|>"]


def _blocks(rng: np.random.Generator, type_name: str, shape: tuple[int, int]) -> np.ndarray:
    """Raw bytes of a tensor of ``shape`` (N, K): quantized by gguf where it can, else random valid blocks."""
    import gguf

    qt = gguf.GGMLQuantizationType[type_name]
    try:
        return gguf.quants.quantize(rng.normal(0, 0.05, shape).astype(np.float32), qt)
    except NotImplementedError:  # K-quants: random codes with small fp16 scales are valid blocks
        block, size = gguf.GGML_QUANT_SIZES[qt]
        n = shape[0] * shape[1] // block
        raw = rng.integers(0, 256, (n, size), dtype=np.uint8)
        small = lambda lo, hi: np.frombuffer(rng.uniform(lo, hi, n).astype(np.float16).tobytes(), np.uint8).reshape(n, 2)  # noqa: E731
        if type_name == "Q6_K":
            raw[:, 208:210] = small(-2e-4, 2e-4)
        else:  # d, dmin
            raw[:, 0:2], raw[:, 2:4] = small(1e-4, 4e-4), small(1e-4, 4e-4)
        return raw.reshape(shape[0], -1)


EXPERT_INTER = 256  # K-quant blocks need 256 along the down projection
#: experts and experts per token by architecture: transformers 4.57 reads a Qwen2-MoE GGUF as 60
#: experts whatever the file says (its config keys miss the renamed architecture), so 60 there
EXPERTS = {"qwen2moe": (60, 4), "qwen3moe": (4, 2)}


def write_tiny_gguf(path: Path, tokenizer_json: Path | None, seed: int = 0, arch: str = "qwen2",
                    rope_freqs: np.ndarray | None = None, expert_count: int | None = None) -> Path:
    """Write a 2-layer Qwen2 (or Llama, or Qwen3 with q/k norms, or Phi-3 with fused q/k/v and gate/up,
    half the head rotated and longrope factors, or the mixtures of experts Qwen2-MoE with its
    shared expert and Qwen3-MoE: experts stacked per role, see ``EXPERTS``) GGUF, quantized linear
    weights; ``expert_count``: that metadata field alone. Its vocabulary is
    the byte-level BPE ``tokenizer_json``, or (``None``) a SentencePiece one with Phi-3's special
    tokens (:func:`spm_vocab`). ``rope_freqs``: llama.cpp's per-frequency rope divisors (Llama 3.1+)."""
    import gguf

    rng = np.random.default_rng(seed)
    # transformers reads a Qwen3 GGUF with head_dim 128 whatever the file says: 2 heads of 128 here
    heads, kv_heads = (2, 1) if arch in ("qwen3", "qwen3moe") else (HEADS, KV_HEADS)
    w = _header(path, arch, heads, kv_heads)
    moe = arch in ("qwen2moe", "qwen3moe")
    experts, per_token = EXPERTS.get(arch, (0, 0))
    if expert_count:  # the metadata of a mixture of experts only (as a Mixtral GGUF says llama)
        w.add_expert_count(expert_count)
    if moe:
        w.add_expert_count(experts)
        w.add_expert_used_count(per_token)
        w.add_expert_feed_forward_length(EXPERT_INTER)
        if arch == "qwen2moe":
            w.add_expert_shared_feed_forward_length(INTER)
    if arch == "phi3":  # Phi-4-mini-like: part of each head rotated, longrope from a short original context
        w.add_rope_dimension_count(PHI3_ROTARY)
        w.add_rope_scaling_orig_ctx_len(32)
        w.add_rope_scaling_attn_factors(math.sqrt(1 + math.log(512 / 32) / math.log(32)))  # as llama.cpp writes it
    tokens = _bpe_vocab(w, tokenizer_json) if tokenizer_json is not None else _spm_phi3_vocab(w)
    f32 = lambda *s: rng.normal(0, 0.05, s).astype(np.float32)  # noqa: E731
    # fp16-representable, so the bundle's fp16 embedding table holds it exactly
    w.add_tensor("token_embd.weight", (f32(len(tokens), HIDDEN) * 10).astype(np.float16).astype(np.float32))
    kv = HIDDEN // heads * kv_heads
    dims = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
            "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN),
            "ffn_down": (HIDDEN, INTER)}
    if arch == "phi3":  # one q/k/v matrix and one gate/up matrix (gate rows first), as llama.cpp stores them
        dims |= {"attn_qkv": (HIDDEN + 2 * kv, HIDDEN), "ffn_up": (2 * INTER, HIDDEN)}
    for i, types in enumerate(LAYER_TYPES):
        w.add_tensor(f"blk.{i}.attn_norm.weight", 1 + f32(HIDDEN))
        w.add_tensor(f"blk.{i}.ffn_norm.weight", 1 + f32(HIDDEN))
        if arch == "phi3":
            types = {"attn_qkv": types["attn_q"], "attn_output": types["attn_output"], "ffn_up": types["ffn_gate"],
                     "ffn_down": types["ffn_down"]}
        for name, t in types.items():
            if moe and name.startswith("ffn_"):  # every expert's matrix, stacked: (experts, out, in)
                n, k = (EXPERT_INTER, HIDDEN) if name != "ffn_down" else (HIDDEN, EXPERT_INTER)
                raw = _blocks(rng, t, (experts * n, k)).reshape(experts, n, -1)
                w.add_tensor(f"blk.{i}.{name}_exps.weight", raw, raw_dtype=gguf.GGMLQuantizationType[t])
                if arch == "qwen2moe":  # the shared expert, as wide as a dense MLP
                    raw = _blocks(rng, t, dims[name])
                    w.add_tensor(f"blk.{i}.{name}_shexp.weight", raw, raw_dtype=gguf.GGMLQuantizationType[t])
                continue
            raw = _blocks(rng, t, dims[name])
            w.add_tensor(f"blk.{i}.{name}.weight", raw, raw_dtype=gguf.GGMLQuantizationType[t])
        if moe:
            w.add_tensor(f"blk.{i}.ffn_gate_inp.weight", f32(experts, HIDDEN) * 20)  # routing that matters
        if arch == "qwen2moe":
            w.add_tensor(f"blk.{i}.ffn_gate_inp_shexp.weight", f32(HIDDEN) * 20)
        for name in ("attn_q", "attn_k", "attn_v") if arch in ("qwen2", "qwen2moe") else ():
            w.add_tensor(f"blk.{i}.{name}.bias", f32(dims[name][0]))
        for name in ("attn_q_norm", "attn_k_norm") if arch in ("qwen3", "qwen3moe") else ():
            w.add_tensor(f"blk.{i}.{name}.weight", 1 + 5 * f32(HIDDEN // heads))
    if arch == "phi3":
        w.add_tensor("rope_factors_long.weight", np.linspace(1.0, 12.0, PHI3_ROTARY // 2).astype(np.float32))
        w.add_tensor("rope_factors_short.weight", np.linspace(1.0, 1.5, PHI3_ROTARY // 2).astype(np.float32))
    if rope_freqs is not None:  # llama.cpp's form of Llama 3.1 rope scaling
        w.add_tensor("rope_freqs.weight", np.asarray(rope_freqs, np.float32))
    w.add_tensor("output_norm.weight", 1 + f32(HIDDEN))
    raw = _blocks(rng, "Q6_K", (len(tokens), HIDDEN))
    w.add_tensor("output.weight", raw, raw_dtype=gguf.GGMLQuantizationType.Q6_K)
    return _finish(w, path)


GEMMA2_HEAD_DIM = 256  # transformers' Gemma 2 reads query_pre_attn_scalar as 256 from a GGUF, whatever it says


def _header(path: Path, arch: str, heads: int, kv_heads: int):
    """A GGUF writer for a 2-layer model of ``arch``, its shape and rope base written."""
    import gguf

    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(2)
    w.add_context_length(512)
    w.add_embedding_length(HIDDEN)
    w.add_feed_forward_length(INTER)
    w.add_head_count(heads)
    w.add_head_count_kv(kv_heads)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_rope_freq_base(10000.0)
    return w


def _finish(w, path: Path) -> Path:
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def _bpe_vocab(w, tokenizer_json: Path) -> list[str]:
    """A byte-level BPE vocabulary (Qwen's kind) into ``w``; its tokens."""
    tok = json.loads(Path(tokenizer_json).read_text())
    vocab = {**tok["model"]["vocab"], **{t["content"]: t["id"] for t in tok["added_tokens"]}}
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    special = {t["content"] for t in tok["added_tokens"]}
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    # CONTROL (3) specials; <|im_start|> as USER_DEFINED (4), as Qwen's <tool_call> is
    w.add_token_types([(4 if t == "<|im_start|>" else 3) if t in special else 1 for t in tokens])
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab["<|im_end|>"])
    w.add_bos_token_id(vocab["<|endoftext|>"])
    w.add_pad_token_id(vocab["<|endoftext|>"])
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    return tokens


def _spm_phi3_vocab(w) -> list[str]:
    """A SentencePiece vocabulary as Phi-3's GGUF files hold one (pieces, bytes, then Phi-3's
    special tokens as controls) into ``w``; its tokens."""
    import gguf

    tokens, scores, types = spm_vocab()
    tokens, scores = tokens + PHI3_SPECIAL, scores + [0.0] * len(PHI3_SPECIAL)
    types += [int(gguf.TokenType.CONTROL)] * len(PHI3_SPECIAL)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(tokens.index("<|end|>"))
    w.add_unk_token_id(3)
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template("{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}<|end|>\n{% endfor %}"
                        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}")
    return tokens


def spm_vocab() -> tuple[list[str], list[float], list[int]]:
    """A small SentencePiece (Unigram) vocabulary as Gemma's GGUF files hold one: controls, <unk>,
    the 256 byte tokens and a few pieces; ``(tokens, scores, token types)``."""
    import gguf

    tt = gguf.TokenType
    specials = [("<pad>", tt.CONTROL), ("<eos>", tt.CONTROL), ("<bos>", tt.CONTROL), ("<unk>", tt.UNKNOWN),
                ("<start_of_turn>", tt.CONTROL), ("<end_of_turn>", tt.CONTROL)]
    pieces = ["▁", "▁def", "▁return", "▁foo", "(x):", "▁x", "▁+", "▁1", "▁hello", "▁world", "print", "("]
    pieces += sorted(set("defoxrtunhlw(): +1abcgimpsv"))
    tokens = [t for t, _ in specials] + [f"<0x{i:02X}>" for i in range(256)] + pieces
    types = [int(k) for _, k in specials] + [int(tt.BYTE)] * 256 + [int(tt.NORMAL)] * len(pieces)
    scores = [0.0] * (len(specials) + 256) + [-float(i) - len(p) for i, p in enumerate(pieces)]
    return tokens, scores, types


def write_tiny_gemma2_gguf(path: Path, seed: int = 0, window: int = 16) -> Path:
    """A 2-layer Gemma 2 GGUF as llama.cpp writes one: norms stored as ``1 + w``, sandwich norms,
    soft-caps and a sliding window in the metadata, a tied embedding, a SentencePiece vocabulary,
    quantized linear weights."""
    import gguf

    rng = np.random.default_rng(seed)
    heads, kv_heads, hd = 2, 1, GEMMA2_HEAD_DIM
    tokens, scores, types = spm_vocab()
    w = _header(path, "gemma2", heads, kv_heads)
    w.add_key_length(hd)
    w.add_value_length(hd)
    w.add_attn_logit_softcapping(50.0)  # Gemma 2's values, which transformers assumes for a GGUF
    w.add_final_logit_softcapping(30.0)
    w.add_sliding_window(window)
    w.add_tokenizer_model("llama")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_space_prefix(False)
    w.add_chat_template("{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
                        "{% endfor %}{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
    f32 = lambda *s: rng.normal(0, 0.05, s).astype(np.float32)  # noqa: E731
    w.add_tensor("token_embd.weight", (f32(len(tokens), HIDDEN) * 10).astype(np.float16).astype(np.float32))
    dims = {"attn_q": (heads * hd, HIDDEN), "attn_k": (kv_heads * hd, HIDDEN), "attn_v": (kv_heads * hd, HIDDEN),
            "attn_output": (HIDDEN, heads * hd), "ffn_gate": (INTER, HIDDEN), "ffn_up": (INTER, HIDDEN),
            "ffn_down": (HIDDEN, INTER)}
    for i, layer in enumerate(LAYER_TYPES):
        for norm in ("attn_norm", "post_attention_norm", "ffn_norm", "post_ffw_norm"):
            w.add_tensor(f"blk.{i}.{norm}.weight", 1 + (1 + f32(HIDDEN)))  # llama.cpp stores Gemma's norms as 1 + w
        for name, t in layer.items():
            raw = _blocks(rng, t, dims[name])
            w.add_tensor(f"blk.{i}.{name}.weight", raw, raw_dtype=gguf.GGMLQuantizationType[t])
    w.add_tensor("output_norm.weight", 1 + (1 + f32(HIDDEN)))
    return _finish(w, path)
