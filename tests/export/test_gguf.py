"""GGUF input: block decoders, the tiny GGUF end to end, and the lossless (quant='gguf') graph."""

from __future__ import annotations

import json

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")
pytest.importorskip("transformers")

from tiny import train_tokenizer as _train_tokenizer  # noqa: E402
from edgellm.export.gguf_blocks import DECODERS, native_weight  # noqa: E402
from tiny_gguf import write_tiny_gguf  # noqa: E402


@pytest.mark.parametrize("type_name", sorted(DECODERS))
def test_block_decoders_match_gguf_dequantize(type_name):
    """Random (valid) blocks of every type decode to exactly what the gguf package dequantizes."""
    rng = np.random.default_rng(1)
    qt = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qt]
    n, k = 6, 512
    raw = rng.integers(0, 256, (n * k // block, size), dtype=np.uint8)
    half = lambda: np.frombuffer(rng.uniform(-0.1, 0.1, len(raw)).astype(np.float16).tobytes(), np.uint8).reshape(-1, 2)  # noqa: E731
    if type_name == "Q6_K":
        raw[:, 208:210] = half()
    else:
        raw[:, 0:2] = half()
        if type_name in ("Q4_1", "Q5_1", "Q4_K", "Q5_K"):
            raw[:, 2:4] = half()
    expected = gguf.quants.dequantize(raw.reshape(n, -1), qt).reshape(n, k)
    w = native_weight(raw, type_name, (n, k))
    assert w.bits in (4, 8) and k % w.block_size == 0
    np.testing.assert_array_equal(w.dequantize(), expected)
    packed = w.packed().dequantize()  # what MatMulNBits multiplies by, before the minimum
    if w.minimum is not None:
        packed = packed - np.repeat(w.minimum, w.block_size, axis=1)
    np.testing.assert_allclose(packed, expected, rtol=0, atol=1e-6 * np.abs(expected).max())


def test_other_types_are_not_native():
    assert native_weight(np.zeros(64, np.uint8), "F16", (2, 16)) is None


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def tiny_gguf(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"gguf_{request.param}")
    _train_tokenizer().save(str(d / "tokenizer.json"))
    return write_tiny_gguf(d / "tiny.gguf", d / "tokenizer.json", seed=2, arch=request.param)


def test_native_blocks_equal_dequantized_tensors(tiny_gguf):
    """Row order included: the llama q/k unpermutation applies to blocks as to dequantized weights."""
    from edgellm.export.source import open_source

    src = open_source(tiny_gguf)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight",
                 "model.layers.1.mlp.down_proj.weight", "lm_head.weight"):
        np.testing.assert_array_equal(src.native(name).dequantize(), src.tensor(name))
    assert src.native("model.embed_tokens.weight") is None  # stored F32


def test_lossless_graph_matches_the_dequantized_fp32_graph(tiny_gguf, tmp_path):
    _lossless_equals_fp32(tiny_gguf, tmp_path)


def test_lossless_phi3_graph_keeps_the_fused_blocks(tmp_path):
    from tiny_gguf import PHI3_SPECIAL

    t = _train_tokenizer()
    t.add_special_tokens(PHI3_SPECIAL)
    t.save(str(tmp_path / "tokenizer.json"))
    _lossless_equals_fp32(write_tiny_gguf(tmp_path / "phi.gguf", tmp_path / "tokenizer.json", seed=2, arch="phi3"),
                          tmp_path)


def _lossless_equals_fp32(path, tmp_path):
    from edgellm.export.builder import DecoderBuilder, QuantConfig, io_names
    from edgellm.export.quality import graph_logits
    from edgellm.export.source import open_source
    from edgellm.runtimes.session import KVLayout

    src = open_source(path)
    s = src.spec
    layout = KVLayout(s.num_layers, s.num_kv_heads, s.head_dim, 64, s.vocab_size, io_names(s.num_layers))
    ids = np.random.default_rng(0).integers(0, s.vocab_size, 24).astype(np.int64)
    logits = {}
    for quant in ("fp32", "gguf"):
        (tmp_path / quant).mkdir()
        b = DecoderBuilder(src, QuantConfig(quant, accuracy_level=1), 64)  # fp32 compute: exact math
        logits[quant] = graph_logits(b.build(tmp_path / quant), layout, ids)
    assert set(b.kept.values()) == set(DECODERS) - {"Q5_1"} and not b.requantized
    ref = logits["fp32"]
    err = np.abs(logits["gguf"] - ref).max() / np.abs(ref).max()
    assert err < 1e-4, err  # summation order is the only difference


def test_export_gguf_defaults_to_lossless_and_reports_it(tiny_gguf, tmp_path):
    import edgellm
    from edgellm.export import export
    from edgellm.bundle import read_manifest

    out = export(tiny_gguf, draft=tiny_gguf, output=tmp_path / "b", max_context=128)
    m = read_manifest(out)
    assert m.target.quantization["quant"] == "gguf" and m.draft.quantization["quant"] == "int4"
    assert sum(m.target.quantization["gguf_blocks_kept"].values()) == 15
    imp = json.loads((out / "quality.json").read_text())["models"]["target"]["import"]
    assert imp["lossless_matmul_weights"] is True and "fp16" in imp["note"]
    llm = edgellm.load(out, threads=1)
    text = "def foo(x): return x + 1"
    assert llm.tokenizer.decode(llm.tokenizer.encode(text, add_special_tokens=False)) == text
    for marker in ("<|im_start|>", "<|im_end|>"):  # USER_DEFINED and CONTROL tokens stay one token each
        assert len(llm.tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    t = llm.generate(text, mode="target", max_new_tokens=12)
    assert llm.generate(text, mode="speculative", max_new_tokens=12).token_ids == t.token_ids


@pytest.mark.parametrize("arch", ["qwen3moe", "qwen2moe"])
def test_gguf_mixture_of_experts_routes_its_experts_exactly(tmp_path, arch):
    """A mixture-of-experts GGUF's default export: attention, shared expert and head keep their
    GGUF blocks, the stacked experts become int8 (QMoE holds no GGUF blocks) and are routed;
    the quality check passes, and speculative and lookup output equal target output."""
    import edgellm
    from edgellm.export import export
    from edgellm.bundle import read_manifest

    tok = tmp_path / "tokenizer.json"
    tok.write_text(_train_tokenizer().to_str())
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", tok, arch=arch)
    out = export(path, draft=path, output=tmp_path / "b", max_context=64, draft_block_size=32)
    q = read_manifest(out).target.quantization
    assert q["quant"] == "gguf" and q["experts"] == "routed"
    assert q["requantized_int8"] == [f"model.layers.{i}.mlp.experts (all {4 if arch == 'qwen3moe' else 60})" for i in (0, 1)]
    assert sum(q["gguf_blocks_kept"].values()) == 2 * (4 + 3 * (arch == "qwen2moe")) + 1  # q/k/v/o, shared, head
    import dataclasses

    llm = edgellm.load(out, threads=1)

    def tokens(prompt: list[int], mode: str) -> list[int]:  # 24 tokens, eos or not
        cfg = dataclasses.replace(llm.decode_config(mode=mode, max_new_tokens=24), eos_token_ids=())
        return [t for r in llm.generate_tokens(prompt, cfg) for t in r.tokens]

    for text in ("def foo(x): return x + 1", "hello world print(foo(1))"):
        prompt = llm.tokenizer.encode(text, add_special_tokens=False)
        ref = tokens(prompt, "target")
        assert tokens(prompt, "speculative") == ref and tokens(prompt, "lookup") == ref, arch


def test_a_gguf_mixture_of_experts_of_another_architecture_is_refused(tmp_path):
    """Mixtral's GGUF files say llama: refused by name, not a missing-weight error, nothing written."""
    from edgellm.errors import ExportError
    from edgellm.export import export

    tok = tmp_path / "tokenizer.json"
    tok.write_text(_train_tokenizer().to_str())
    path = write_tiny_gguf(tmp_path / "mixtral.gguf", tok, arch="llama", expert_count=8)
    with pytest.raises(ExportError, match="mixture of experts of GGUF architecture 'llama' is not supported; "
                                          "allowed: qwen2moe, qwen3moe"):
        export(path, output=tmp_path / "b", max_context=64)
    assert not (tmp_path / "b").exists()


def test_gguf_quant_needs_a_gguf_source(tiny_model_dir, tmp_path):
    from edgellm.errors import ConfigError
    from edgellm.export import export

    with pytest.raises(ConfigError, match="quant='gguf'"):
        export(tiny_model_dir, output=tmp_path / "b", quant="gguf")
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["qwen3", "llama", "qwen2", "qwen3moe", "qwen2moe"])
def test_gguf_passes_the_full_quality_check(tmp_path, arch):
    """The fp32 graph of a GGUF equals transformers' run of it, checked by the exporter itself
    (quality='full' fails an export that differs): Qwen3's per-head q/k norms, and Llama's q/k
    rows, which llama.cpp's converter permutes (undoing that with the permutation itself instead
    of its inverse once gave a wrong graph that only this comparison sees)."""
    import edgellm
    from edgellm.export import export

    tok = tmp_path / "tokenizer.json"
    tok.write_text(_train_tokenizer().to_str())
    path = write_tiny_gguf(tmp_path / f"{arch}.gguf", tok, arch=arch)
    out = export(path, output=tmp_path / "b", quant="fp32", max_context=64, quality="full")
    src = json.loads((out / "quality.json").read_text())["models"]["target"]["fp32_vs_source"]
    assert src["top1_agreement"] == 1.0 and src["max_abs_diff"] < 1e-3
    assert edgellm.load(out).manifest.target.architecture == {"qwen3moe": "qwen3_moe", "qwen2moe": "qwen2_moe"}.get(arch, arch)


LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
          "original_max_position_embeddings": 256}  # a short original context: tiny heads get all three kinds


def _llama3_factors() -> np.ndarray:
    """What llama.cpp's converter writes as rope_freqs for LLAMA3: default / llama3 inverse frequencies,
    computed by transformers itself."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = LlamaConfig(hidden_size=256, num_attention_heads=4, rope_theta=10000.0, rope_scaling=LLAMA3,
                      max_position_embeddings=512)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](cfg, "cpu")
    default, _ = ROPE_INIT_FUNCTIONS["default"](cfg, "cpu")
    return (default / scaled).numpy().astype(np.float32)


def test_gguf_llama31_rope_factors_give_the_llama3_model(tmp_path):
    """A Llama 3.1-style GGUF (rope_freqs): the exported graph is the Hugging Face model with its
    llama3 rope scaling, and the exporter's own full check (transformers reading the GGUF, which
    drops rope_freqs, with the factors put back) passes."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    import edgellm
    from edgellm.export import export

    tok = tmp_path / "tokenizer.json"
    tok.write_text(_train_tokenizer().to_str())
    factors = _llama3_factors()
    assert ((factors == 8).sum(), ((factors > 1) & (factors < 8)).sum(), (factors == 1).sum()) >= (8, 3, 4)  # scaled, smoothed, kept
    path = write_tiny_gguf(tmp_path / "l31.gguf", tok, arch="llama", rope_freqs=factors)
    out = export(path, output=tmp_path / "b", quant="fp32", max_context=64, quality="full")
    src = json.loads((out / "quality.json").read_text())["models"]["target"]["fp32_vs_source"]
    assert src["top1_agreement"] == 1.0 and src["max_abs_diff"] < 1e-3

    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="l31.gguf", torch_dtype=torch.float32)
    hf.config.rope_scaling = LLAMA3
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=hf.config)
    llm = edgellm.load(out, threads=1)
    ids = np.array(llm.tokenizer.encode("def fib(n): return n if n < 2 else fib(n - 1) + fib(n - 2) " * 2)[:60])
    with torch.no_grad():
        want = hf(torch.tensor(ids)[None]).logits[0].numpy()
    got = llm.target.forward(ids, len(ids))[:, : want.shape[1]]
    assert np.abs(got - want).max() < 1e-3 and (got.argmax(-1) == want.argmax(-1)).all()
    # without the factors the model is another one: the check above would see it
    hf.model.rotary_emb = LlamaRotaryEmbedding(config=type(hf.config)(**{**hf.config.to_dict(), "rope_scaling": None}))
    with torch.no_grad():
        plain = hf(torch.tensor(ids)[None]).logits[0].numpy()
    assert np.abs(plain - want).max() > 1e-2


def test_gguf_rope_factors_of_the_wrong_length_are_refused(tmp_path):
    from edgellm.errors import ExportError
    from edgellm.export import export

    tok = tmp_path / "tokenizer.json"
    tok.write_text(_train_tokenizer().to_str())
    path = write_tiny_gguf(tmp_path / "bad.gguf", tok, arch="llama", rope_freqs=np.ones(5, np.float32))
    with pytest.raises(ExportError, match="rope_freqs: 5 factors for 32 frequencies"):
        export(path, output=tmp_path / "b", max_context=64)
    assert not (tmp_path / "b").exists()



@pytest.mark.parametrize("vocab", ["byte-level", "sentencepiece"])
def test_gguf_phi3_fused_partial_rotary_and_longrope(tmp_path, vocab):
    """A Phi-4-mini-like GGUF: fused q/k/v and gate/up (llama.cpp's attn_qkv and ffn_up), half of each
    head rotated (rope.dimension_count) and longrope factors (rope_factors_long/short). The exported
    graph equals transformers' Phi-3 built from that config and the file's weights, on both sides of
    the switch to the long factors; the exporter's own full check (transformers reading the GGUF,
    the rotary settings its loader drops put back) passes too. Its tokenizer, byte-level (Phi-4-mini)
    or SentencePiece (Phi-3, 3.5), gives text back unchanged, Phi-3's control tokens one token each."""
    import torch
    from transformers import Phi3Config, Phi3ForCausalLM

    import edgellm
    from edgellm.export import export
    from edgellm.export.source import open_source
    from tiny_gguf import PHI3_ROTARY, PHI3_SPECIAL

    tok = None
    if vocab == "byte-level":
        tok = tmp_path / "tokenizer.json"
        t = _train_tokenizer()
        t.add_special_tokens(PHI3_SPECIAL)
        tok.write_text(t.to_str())
    path = write_tiny_gguf(tmp_path / "phi.gguf", tok, arch="phi3")
    out = export(path, output=tmp_path / "b", quant="fp32", max_context=64, quality="full")
    src = json.loads((out / "quality.json").read_text())["models"]["target"]["fp32_vs_source"]
    assert src["top1_agreement"] == 1.0 and src["max_abs_diff"] < 1e-3

    gguf = open_source(path)
    assert gguf.spec.architecture == "phi3"
    cfg = Phi3Config(vocab_size=gguf.spec.vocab_size, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=10000.0,
                     max_position_embeddings=512, original_max_position_embeddings=32,
                     partial_rotary_factor=PHI3_ROTARY / 64, tie_word_embeddings=False, pad_token_id=0,
                     rope_scaling={"type": "longrope",
                                   "long_factor": np.linspace(1.0, 12.0, PHI3_ROTARY // 2).tolist(),
                                   "short_factor": np.linspace(1.0, 1.5, PHI3_ROTARY // 2).tolist()})
    hf = Phi3ForCausalLM(cfg).eval()
    hf.load_state_dict({k: torch.from_numpy(np.array(gguf.tensor(k))) for k in hf.state_dict()}, strict=True)
    llm = edgellm.load(out, threads=1)
    text = "def foo(x): return x + 1 # héllo 😀"
    assert llm.tokenizer.decode(llm.tokenizer.encode(text, add_special_tokens=False)) == text
    for marker in ("<|user|>", "<|end|>", "<|assistant|>"):
        assert len(llm.tokenizer.encode(marker, add_special_tokens=False)) == 1, marker
    for n in (24, 48):  # the short factors, then (from position 32, the original context) the long ones
        ids = np.random.default_rng(n).integers(0, gguf.spec.vocab_size, n).astype(np.int64)
        with torch.no_grad():  # longrope switches by position: 32 tokens in one call, then one a call
            r = hf(torch.tensor(ids[:32])[None], use_cache=True)
            want, past = [r.logits[0].numpy()], r.past_key_values
            for t in ids[32:]:
                r = hf(torch.tensor([[int(t)]]), past_key_values=past, use_cache=True)
                want.append(r.logits[0].numpy())
                past = r.past_key_values
            want = np.concatenate(want)
        llm.target.rollback(0)
        got = llm.target.forward(ids, n)[:, : want.shape[1]]
        assert np.abs(got - want).max() < 1e-3, (n, np.abs(got - want).max())
        assert (got.argmax(-1) == want.argmax(-1)).all()


def test_gguf_gemma2_passes_the_full_quality_check(tmp_path):
    """A Gemma 2 GGUF as llama.cpp writes one (norms stored as 1 + w, sandwich norms, soft-caps, a
    sliding window shorter than the text, a SentencePiece vocabulary): the fp32 graph equals
    transformers' reading of the file (the exporter's own full check), the tokenizer round-trips,
    and speculative output equals target output past the window."""
    import edgellm
    from edgellm.export import export
    from tiny_gguf import write_tiny_gemma2_gguf

    path = write_tiny_gemma2_gguf(tmp_path / "g2.gguf", window=16)
    out = export(path, output=tmp_path / "b", quant="fp32", max_context=64, quality="full")
    src = json.loads((out / "quality.json").read_text())["models"]["target"]["fp32_vs_source"]
    assert src["top1_agreement"] == 1.0 and src["max_abs_diff"] < 1e-3
    llm = edgellm.load(out, threads=1)
    assert llm.manifest.target.architecture == "gemma2"
    text = "def foo(x): return x + 1 hello world"
    assert llm.tokenizer.decode(llm.tokenizer.encode(text, add_special_tokens=False)) == text
    t = llm.generate(text, mode="target", max_new_tokens=40)
    assert llm.generate(text, mode="lookup", max_new_tokens=40).token_ids == t.token_ids
