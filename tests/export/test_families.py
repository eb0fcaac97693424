"""Model families: tiny random models of each family, exported and checked against transformers.

Weights are drawn larger than transformers' init (and norms away from 1) so that a wrong
activation, norm offset or rope changes the logits far past the tolerance (checked below).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from helpers import make_tiny_hf_model, run_concurrently
from edgellm.errors import ExportError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import edgellm  # noqa: E402
from edgellm.export import export  # noqa: E402
from edgellm.runtimes.providers import resolve_provider  # noqa: E402
from edgellm.runtimes.session import DecoderSession, KVLayout  # noqa: E402
from edgellm.bundle import read_manifest  # noqa: E402

COMMON = dict(vocab_size=320, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, eos_token_id=2)
SLIDING = ["sliding_attention", "full_attention"]
# name -> (config class, its fields beyond COMMON)
FAMILIES = {
    "llama3-rope": ("LlamaConfig", dict(rope_theta=10000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-yarn": ("LlamaConfig", dict(rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32})),
    "llama-linear-gelu": ("LlamaConfig", dict(hidden_act="gelu", rope_scaling={"rope_type": "linear", "factor": 3.0})),
    "mistral-sliding": ("MistralConfig", dict(sliding_window=6, head_dim=16)),
    "qwen3": ("Qwen3Config", dict(head_dim=16)),
    "qwen3-sliding": ("Qwen3Config", dict(head_dim=16, use_sliding_window=True, sliding_window=5, max_window_layers=1)),
    "gemma": ("GemmaConfig", dict(head_dim=16, hidden_act="gelu_pytorch_tanh")),
    "gemma2": ("Gemma2Config", dict(head_dim=16, sliding_window=6, layer_types=SLIDING, query_pre_attn_scalar=24,
                                    attn_logit_softcapping=4.0, final_logit_softcapping=6.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, sliding_window=6, layer_types=SLIDING, query_pre_attn_scalar=12,
                                        rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 2.0})),
    "phi3": ("Phi3Config", dict(hidden_size=128, partial_rotary_factor=0.5, max_position_embeddings=64,
                                original_max_position_embeddings=16, pad_token_id=0, rope_scaling={
                                    "type": "longrope", "short_factor": [1.0, 1.1, 1.3, 1.6, 2.0, 2.5, 3.0, 4.0],
                                    "long_factor": [1.0, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0]})),
    "smollm3": ("SmolLM3Config", dict(no_rope_layers=[1, 0], use_sliding_window=False, pad_token_id=0)),
    "granite": ("GraniteConfig", dict(embedding_multiplier=3.0, residual_multiplier=0.4, attention_multiplier=0.2,
                                      logits_scaling=2.5)),
    "olmo2": ("Olmo2Config", dict(pad_token_id=0)),
    # mixtures of experts: 4 experts, 2 per token; Qwen's with a dense layer among the sparse ones
    "mixtral": ("MixtralConfig", dict(head_dim=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         shared_expert_intermediate_size=80, mlp_only_layers=[1])),
    "qwen3_moe": ("Qwen3MoeConfig", dict(head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                                         norm_topk_prob=True, decoder_sparse_step=2)),
    "olmoe": ("OlmoeConfig", dict(num_experts=4, num_experts_per_tok=2, pad_token_id=0)),
    "granitemoe": ("GraniteMoeConfig", dict(num_local_experts=4, num_experts_per_tok=2, intermediate_size=64,
                                            embedding_multiplier=3.0, residual_multiplier=0.4,
                                            attention_multiplier=0.2, logits_scaling=2.5)),
    "granitemoeshared": ("GraniteMoeSharedConfig", dict(num_local_experts=4, num_experts_per_tok=2,
                                                        intermediate_size=64, shared_intermediate_size=80)),
}
PROMPTS = [list(range(5, 25)), [7, 300, 4, 9] * 5, list(range(100, 140, 2)), [5, 6, 7, 8, 9]]  # the last crosses longrope's switch while generating


def make_family_model(folder, name: str, seed: int = 0):
    """A random 2-layer model of family ``name`` (norm weights and linear weights made to matter)."""
    cls_name, extra = FAMILIES[name]
    config = getattr(transformers, cls_name)(**(COMMON | extra))
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config)
    offset = "gemma" in config.model_type  # Gemma's norms multiply by (1 + w)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.uniform_(-0.5, 0.5) if offset else p.uniform_(0.5, 1.5)
            elif p.dim() >= 2 and "embed" not in pname:  # Granite stacks its experts: 3 dims
                p.normal_(0.0, 0.15)
            elif "bias" in pname:
                p.normal_(0.0, 0.1)
        model.get_output_embeddings().weight.mul_(4.0)
    return make_tiny_hf_model(folder, model=model)


def _torch_model(model_dir):
    # eager attention: transformers' sdpa path leaves out Gemma 2's attention soft-capping
    return transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32,
                                                             attn_implementation="eager").eval()


def _torch_logits(model_dir, ids, stepwise: bool = False):
    """transformers' logits for ``ids``: one forward call, or (``stepwise``) one token at a time
    with its cache — how longrope's per-position switch is defined (see the builder's
    ``_rope_caches``): transformers switches by the length of each call."""
    model = _torch_model(model_dir)
    with torch.no_grad():
        if not stepwise:
            return model(torch.tensor(ids)[None]).logits[0].numpy()
        out, past = [], None
        for t in ids:
            r = model(torch.tensor([[int(t)]]), past_key_values=past, use_cache=True)
            out.append(r.logits[0, -1].numpy())
            past = r.past_key_values
        return np.stack(out)


def _torch_greedy(model, prompt, n, vocab, stepwise: bool = False):
    """Greedy tokens from full forward passes (no cache: the reference does not depend on one),
    over the ``vocab`` ids the tokenizer has (the logits are padded past them, as Qwen's are);
    ``stepwise``: one token per call with the cache, prompt included (longrope, see _torch_logits)."""
    seq = list(prompt)
    with torch.no_grad():
        if stepwise:
            past = None
            for t in seq:
                r = model(torch.tensor([[t]]), past_key_values=past, use_cache=True)
                past = r.past_key_values
            for _ in range(n):
                seq.append(int(r.logits[0, -1, :vocab].argmax()))
                r = model(torch.tensor([[seq[-1]]]), past_key_values=past, use_cache=True)
                past = r.past_key_values
            return seq[len(prompt):]
        for _ in range(n):
            seq.append(int(model(torch.tensor(seq)[None]).logits[0, -1, :vocab].argmax()))
    return seq[len(prompt):]


def _tokens(llm, prompt, mode, n=24, **options):
    cfg = dataclasses.replace(llm.decode_config(mode=mode, max_new_tokens=n, **options), eos_token_ids=())
    return [t for r in llm.generate_tokens(prompt, cfg) for t in r.tokens]


def _session(bundle):
    e = read_manifest(bundle).target
    layout = KVLayout(e.num_layers, e.num_kv_heads, e.head_dim, e.max_context, e.vocab_size, e.io)
    return DecoderSession(bundle / e.graph, layout, resolve_provider("cpu"), threads=1)


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request, tmp_path_factory):
    folder = make_family_model(tmp_path_factory.mktemp(request.param), request.param)
    bundle = export(folder, draft=folder, output=tmp_path_factory.mktemp("b") / "fp32", quant="fp32",
                    draft_quant="int4", draft_block_size=32, max_context=64, quality="none")
    return request.param, folder, bundle


def test_fp32_logits_match_transformers(family):
    name, folder, bundle = family
    ids = np.random.default_rng(0).integers(3, 300, 24)
    # a prefill, one step, a 5-token verify pass, a rollback and a re-run must all match torch;
    # phi3's longrope switches factors past 16 positions, by position (torch decoding token by token)
    ref = _torch_logits(folder, ids, stepwise=name == "phi3")
    sess = _session(bundle)
    got = [sess.forward(ids[:9], 9), sess.forward(ids[9:10], 1), sess.forward(ids[10:15], 5)[:2]]
    sess.rollback(12)
    got.append(sess.forward(ids[12:], 12))
    np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-4)


def test_greedy_and_speculative_outputs_match_transformers(family):
    name, folder, bundle = family
    model = _torch_model(folder)
    llm = edgellm.load(bundle, threads=1)
    for prompt in PROMPTS:
        ref = _torch_greedy(model, prompt, 24, llm.manifest.tokenizer["vocab_size"], stepwise=name == "phi3")
        assert _tokens(llm, prompt, "target") == ref, (name, prompt)
        for mode in ("speculative", "lookup"):
            assert _tokens(llm, prompt, mode) == ref, (name, mode, prompt)
    for gamma in (2, 5):  # verify passes that straddle longrope's switch (and windows' edges)
        assert _tokens(llm, PROMPTS[-1], "speculative", num_draft_tokens=gamma) == ref, (name, gamma)


def test_int4_export_is_exact_under_speculation(family, tmp_path):
    name, folder, _ = family
    bundle = export(folder, draft=folder, output=tmp_path / "int4", quant="int4", block_size=32,
                    draft_block_size=32, max_context=64, quality="none")
    assert read_manifest(bundle).target.quantization["quant"] == "int4"
    if name in MOE:  # the experts are routed (a row reads only its own), and still exact
        assert _ops(bundle).count("QMoE") == sum(_sparse_layers(folder)), name
        assert read_manifest(bundle).target.quantization["experts"] == "routed"
        from click.testing import CliRunner
        from edgellm.cli import cli

        assert "mixture of experts: routed" in CliRunner().invoke(cli, ["inspect", str(bundle)]).output
    llm = edgellm.load(bundle, threads=1)
    for prompt in PROMPTS[:2]:
        ref = _tokens(llm, prompt, "target")
        assert _tokens(llm, prompt, "speculative") == ref and _tokens(llm, prompt, "lookup") == ref, name
    if name in MOE:  # routed experts in the batch graph: each sequence gets its solo output
        requests = [("def foo(x): return x", dict(mode="speculative", max_new_tokens=20)),
                    ("hello hello hello world " * 3, dict(mode="lookup", max_new_tokens=16)),
                    ("abc", dict(mode="target", max_new_tokens=24))]
        expected = [llm.generate(p, **kw).token_ids for p, kw in requests]
        assert run_concurrently(edgellm.load(bundle, threads=1, max_batch=3), requests) == expected, name


MOE = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "granitemoe", "granitemoeshared")


def _ops(bundle) -> list[str]:
    import onnx

    return [n.op_type for n in onnx.load(str(bundle / read_manifest(bundle).target.graph), load_external_data=False).graph.node]


def _sparse_layers(folder) -> tuple[bool, ...]:
    from edgellm.export.source import open_source

    return open_source(folder).spec.features.experts.sparse


@pytest.mark.parametrize("name", MOE)
def test_routed_experts_compute_what_every_expert_computes(name, tmp_path, monkeypatch):
    """The routed experts (QMoE, one call per top-k slot, every row twice) give the logits of
    the graph that runs every expert, to 1e-4, when both keep fp32 activations (at int8
    activations the two round the down projection's inputs differently: its rows are scaled
    by the routing weight before it in one and after it in the other). Same int4 weights: this
    checks the routing, the gate/up interleaving, the slots' sum and the shared expert."""
    from edgellm.export import builder

    folder = make_family_model(tmp_path / "moe", name)
    post = builder.QuantConfig.__post_init__
    monkeypatch.setattr(builder.QuantConfig, "__post_init__",
                        lambda q: (object.__setattr__(q, "accuracy_level", 0), post(q))[1])
    ids = np.random.default_rng(0).integers(3, 300, 24)
    logits = {}
    for path, reason in (("routed", None), ("every", "forced here")):
        monkeypatch.setattr(builder, "routed_experts_reason", lambda *a, reason=reason: reason)
        b = export(folder, output=tmp_path / path, quant="int4", block_size=32, max_context=64, quality="none")
        assert ("QMoE" in _ops(b)) == (path == "routed")
        assert read_manifest(b).target.quantization["experts"] == (
            "routed" if path == "routed" else "every expert per row: forced here")
        sess = _session(b)
        logits[path] = np.concatenate([sess.forward(ids[:9], 9), sess.forward(ids[9:10], 1), sess.forward(ids[10:15], 5)])
    np.testing.assert_allclose(logits["routed"], logits["every"], atol=1e-4)


@pytest.mark.parametrize("quant,block_size", [("int4", 32), ("int4", 64), ("int8", 32)])
def test_routed_experts_give_a_row_the_same_bits_in_any_pass(quant, block_size, tmp_path):
    """Wide enough for onnxruntime's expert kernel to sum a row's experts in an order set by the
    other rows (64 experts, 8 per token), and at block 64 to round an expert's odd row apart: a
    row decoded alone and the same row in a verify pass of 2..7 rows agree bit for bit, so
    speculative output stays the target's."""
    from edgellm.runtimes.graphs import matmul_row_multiple

    folder = make_tiny_hf_model(tmp_path / "wide", model=transformers.AutoModelForCausalLM.from_config(
        transformers.MixtralConfig(**(COMMON | dict(hidden_size=256, intermediate_size=256, num_hidden_layers=1,
                                                    num_local_experts=64, num_experts_per_tok=8, head_dim=64)))))
    b = export(folder, output=tmp_path / "b", quant=quant, block_size=block_size, max_context=64, quality="none")
    assert "QMoE" in _ops(b)
    sess, ids = _session(b), np.random.default_rng(1).integers(3, 300, 24)
    sess.min_rows, sess.row_multiple = 2, matmul_row_multiple(read_manifest(b).target.quantization)  # as the target runs
    sess.forward(ids[:10], 1)
    alone = np.concatenate([sess.forward(ids[j:j + 1], 1) for j in range(10, 24)])
    for rows in range(2, 8):
        sess.rollback(10)
        got = np.concatenate([sess.forward(ids[j:j + rows], len(ids[j:j + rows])) for j in range(10, 24, rows)])
        np.testing.assert_array_equal(got, alone, err_msg=f"passes of {rows} rows")


def test_what_keeps_every_expert_computed():
    """Storage or shapes onnxruntime's expert kernel does not take fall back to every expert, by name."""
    from edgellm.export.builder import QuantConfig, routed_experts_reason
    from edgellm.export.families import Experts

    e = Experts(count=8, top_k=2, normalize=True, intermediate_size=96, shared_intermediate_size=0, sparse=(True,))
    assert routed_experts_reason(QuantConfig("int4", block_size=32), "silu", 64, e) is None
    assert routed_experts_reason(QuantConfig("int8", block_size=32), "silu", 64, e) is None
    for q, act, hidden, says in ((QuantConfig("fp32"), "silu", 64, "quant 'fp32'"),
                                 (QuantConfig("int4", block_size=64), "silu", 64, "expert width 96"),
                                 (QuantConfig("int4", block_size=32), "silu", 80, "hidden_size 80"),
                                 (QuantConfig("int4", block_size=32), "gelu_tanh", 64, "gelu_tanh activation"),
                                 (QuantConfig("int4", accuracy_level=1), "silu", 64, "accuracy_level 1"),
                                 (QuantConfig("int4", activations="fp16"), "silu", 64, "fp16 activations")):
        assert says in routed_experts_reason(q, act, hidden, e)


def test_the_models_are_sensitive_to_what_the_family_changes(tmp_path, monkeypatch):
    """The tiny weights have power: a Gemma 3 graph built with Llama's activation or without the
    norm offset leaves the tolerance far behind — and the full quality check then fails the export."""
    from edgellm.export import families

    folder = make_family_model(tmp_path / "g3", "gemma3")
    ids = np.random.default_rng(0).integers(3, 300, 24)
    ref = _torch_logits(folder, ids)
    wrongs = {"silu": lambda m: m.setitem(families.ACTIVATIONS, "gelu_pytorch_tanh", "silu"),
              "no_offset": lambda m: m.setitem(families.FAMILIES, "gemma3_text",
                                               dataclasses.replace(families.FAMILIES["gemma3_text"], norm_offset=0.0))}
    for wrong, patch in wrongs.items():
        with monkeypatch.context() as m:
            patch(m)
            b = export(folder, output=tmp_path / wrong, quant="fp32", max_context=64, quality="none")
            assert np.abs(_session(b).forward(ids, 24) - ref).max() > 0.1, wrong
            with pytest.raises(ExportError, match="differs from the source model"):
                export(folder, output=tmp_path / "gated", quant="fp32", max_context=64, quality="full")
            assert not (tmp_path / "gated").exists()


@pytest.mark.parametrize("family", ["qwen2_moe", "granitemoeshared"])
def test_the_experts_are_routed_as_transformers_routes(family, tmp_path, monkeypatch):
    """The tiny mixtures of experts have power too: renormalizing the kept probabilities or not
    (whichever the family does not), keeping one expert too many or too few, or dropping the
    shared expert (gated in Qwen2-MoE, always added in Granite) moves the logits far past the
    tolerance, and the full quality check then fails the export."""
    from edgellm.export import families

    folder = make_family_model(tmp_path / "moe", family)
    ids = np.random.default_rng(0).integers(3, 300, 24)
    ref = _torch_logits(folder, ids)
    read = families._experts
    wrongs = {"renormalized or not": lambda e: dict(normalize=not e.normalize), "one more": lambda e: dict(top_k=3),
              "one fewer": lambda e: dict(top_k=1), "no shared expert": lambda e: dict(shared_intermediate_size=0)}
    for wrong, change in wrongs.items():
        with monkeypatch.context() as m:
            m.setattr(families, "_experts", lambda *a, change=change: dataclasses.replace(read(*a), **change(read(*a))))
            b = export(folder, output=tmp_path / wrong, quant="fp32", max_context=64, quality="none")
            assert np.abs(_session(b).forward(ids, 24) - ref).max() > 0.1, wrong
            with pytest.raises(ExportError, match="differs from the source model"):
                export(folder, output=tmp_path / "gated", quant="fp32", max_context=64, quality="full")
            assert not (tmp_path / "gated").exists()


def test_a_mixture_of_experts_takes_lora_on_its_attention(tmp_path):
    """An adapter on a mixture of experts' attention (q/v) gives PEFT's merged model's greedy
    output, in target and speculative mode, on the routed int4 graph too (against its own
    target mode); one that changes the experts (and the shared expert) is refused by name."""
    pytest.importorskip("peft")
    from test_lora import make_adapter, peft_greedy

    folder = make_family_model(tmp_path / "moe", "qwen2_moe")
    qv = make_adapter(folder, tmp_path / "qv", 1, b_std=0.6, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    gates = make_adapter(folder, tmp_path / "gates", 2, r=2, lora_alpha=4, target_modules=["gate_proj"])
    with pytest.raises(ExportError, match="allowed: the attention projections \\(a mixture of experts' experts"):
        export(folder, output=tmp_path / "x", lora={"gates": gates}, max_context=64)
    assert not (tmp_path / "x").exists()
    b = export(folder, draft=folder, output=tmp_path / "fp32", quant="fp32", draft_quant="fp32", max_context=64,
               quality="full", lora={"qv": qv}, draft_lora={"qv": qv})
    llm = edgellm.load(b, threads=1)
    vocab = llm.manifest.tokenizer["vocab_size"]

    def tokens(llm, prompt, mode):
        cfg = dataclasses.replace(llm.decode_config(mode=mode, max_new_tokens=24), eos_token_ids=())
        return [t for r in llm.generate_tokens(prompt, cfg, adapter="qv") for t in r.tokens]

    for prompt in PROMPTS[:2]:
        ref = peft_greedy(folder, qv, prompt, 24, vocab)
        assert tokens(llm, prompt, "target") == ref and tokens(llm, prompt, "speculative") == ref, prompt
    routed = edgellm.load(export(folder, draft=folder, output=tmp_path / "int4", quant="int4", max_context=64,
                                 quality="none", lora={"qv": qv}), threads=1)
    assert read_manifest(tmp_path / "int4").target.quantization["experts"] == "routed"
    for prompt in PROMPTS[:2]:
        assert tokens(routed, prompt, "speculative") == tokens(routed, prompt, "target"), prompt


def test_what_mixtures_of_experts_refuse(tmp_path):
    """npu graphs and impossible routing settings are refused by name, nothing written."""
    folder = make_family_model(tmp_path / "moe", "mixtral")
    with pytest.raises(ExportError, match="experts .*no npu graph"):
        export(folder, output=tmp_path / "b", target_device="npu", max_context=64)
    import json

    cfg = json.loads((folder / "config.json").read_text())
    for field, value, says in (("num_experts_per_tok", 5, "exceeds the 4 experts"), ("num_local_experts", 0, "positive"),
                               ("clip_qkv", 8.0, "clip_qkv 8.0 is not supported")):
        (folder / "config.json").write_text(json.dumps(cfg | {field: value}))
        with pytest.raises(ExportError, match=says):
            export(folder, output=tmp_path / "c", max_context=64)
    shared = make_family_model(tmp_path / "shared", "granitemoeshared")
    cfg = json.loads((shared / "config.json").read_text())
    for value in ("80", -8, 2.5):  # a shared expert's width is a positive integer, or 0 / absent for none
        (shared / "config.json").write_text(json.dumps(cfg | {"shared_intermediate_size": value}))
        with pytest.raises(ExportError, match=f"shared_intermediate_size {value!r} is not allowed; allowed: a positive"):
            export(shared, output=tmp_path / "c", max_context=64)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["moe", "shared"]


def test_wide_heads_give_every_row_the_same_bits_in_any_pass(tmp_path):
    """head_dim 256 (Gemma): onnxruntime's CPU attention sums q . k in one slice up to 64 keys and
    in two beyond, so the session never lets a pass hold rows on both sides of 64 keys; then a row
    decoded alone and the same row verified among others agree bit for bit."""
    from edgellm.runtimes.graphs import attention_boundaries

    assert attention_boundaries(128) == () and attention_boundaries(256) == (64,)
    assert attention_boundaries(512) == (32, 64)
    cls_name, extra = FAMILIES["gemma3"]
    FAMILIES["gemma3-wide"] = (cls_name, extra | dict(head_dim=256, num_attention_heads=2, num_key_value_heads=1))
    try:
        folder = make_family_model(tmp_path / "wide", "gemma3-wide")
    finally:
        del FAMILIES["gemma3-wide"]
    bundle = export(folder, output=tmp_path / "b", quant="int4", block_size=32, max_context=128, quality="none")
    sess = _session(bundle)
    sess.min_rows = 2  # as the target runs
    ids = np.random.default_rng(1).integers(3, 300, 100)
    for start in (41, 50, 58, 63):
        sess.rollback(0)
        sess.forward(ids[:start], 1)
        alone = np.stack([sess.forward(ids[i:i + 1], 1)[0] for i in range(start, start + 12)])
        for k in (2, 3, 6, 12):
            sess.rollback(start)
            batched = np.concatenate([sess.forward(ids[j:j + k], k) for j in range(start, start + 12, k)])
            assert (batched == alone).all(), (start, k)
    llm = edgellm.load(bundle, threads=1)
    prompt = list(ids[:50])
    assert _tokens(llm, prompt, "lookup", 40) == _tokens(llm, prompt, "target", 40)


def test_a_draft_of_another_family_with_the_same_tokenizer(tmp_path):
    """Families do not have to match, tokenizers do: a Qwen3 draft for a Gemma 3 target."""
    target = make_family_model(tmp_path / "t", "gemma3")
    draft = make_family_model(tmp_path / "d", "qwen3", seed=1)
    bundle = export(target, draft=draft, output=tmp_path / "b", quant="fp32", draft_quant="int4",
                    draft_block_size=32, max_context=64, quality="none")
    m = read_manifest(bundle)
    assert (m.target.architecture, m.draft.architecture) == ("gemma3_text", "qwen3")
    llm = edgellm.load(bundle, threads=1)
    assert _tokens(llm, PROMPTS[0], "speculative") == _tokens(llm, PROMPTS[0], "target")


def test_blocks_of_64_keep_rows_in_pairs(tmp_path):
    """int4 blocks of 64+ weights: onnxruntime computes rows in pairs and an odd last row with
    another kernel, so the target pads every pass to an even row count and a row decoded alone
    equals the same row verified among others, bit for bit (fails without the padding)."""
    from edgellm.api import _session
    from edgellm.runtimes.providers import resolve_provider

    folder = make_family_model(tmp_path / "m", "qwen3")
    bundle = export(folder, output=tmp_path / "b", quant="int4", block_size=64, max_context=128, quality="none")
    m = read_manifest(bundle)
    sess = _session(bundle, m.target, "onnx", resolve_provider("cpu"), 1, min_rows=2)
    assert sess.row_multiple == 2
    from edgellm.export.builder import QuantConfig
    from edgellm.runtimes.graphs import matmul_row_multiple

    # an fp16 body with an int4 head still has blocks of 64 to pad for
    assert matmul_row_multiple(QuantConfig("fp16", 64, lm_head_quant="int4").to_dict()) == 2
    ids = np.random.default_rng(1).integers(3, 300, 60)
    sess.forward(ids[:30], 1)
    alone = np.stack([sess.forward(ids[i:i + 1], 1)[0] for i in range(30, 51)])
    for k in (3, 5, 7):
        sess.rollback(30)
        batched = np.concatenate([sess.forward(ids[j:min(j + k, 51)], min(k, 51 - j)) for j in range(30, 51, k)])
        assert (batched == alone).all(), k


def test_batched_passes_give_each_sequence_its_solo_output(family):
    """The batch graph (one attention node per slot) keeps each family's attention exact: windows,
    soft-caps, no-rope layers, longrope past its switch."""
    name, _, bundle = family
    assert read_manifest(bundle).target.batch_graph is not None, name
    requests = [("def foo(x): return x", dict(mode="speculative", max_new_tokens=20)),
                ("hello hello hello world " * 3, dict(mode="lookup", max_new_tokens=16)),
                ("abc", dict(mode="target", max_new_tokens=24)),
                ("x = 1\ny = 2\n", dict(mode="speculative", temperature=0.8, seed=3, max_new_tokens=16))]
    alone = edgellm.load(bundle, threads=1)
    expected = [alone.generate(p, **kw).token_ids for p, kw in requests]
    assert run_concurrently(edgellm.load(bundle, threads=1, max_batch=3), requests) == expected, name
