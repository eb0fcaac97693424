"""Exporter: tiny random Hugging Face models exported at every quantization."""

from __future__ import annotations

import json

import numpy as np
import pytest

from helpers import make_tiny_hf_model
from edgellm.errors import ConfigError, ExportError, IncompatibleModelsError
from edgellm.bundle import read_manifest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from edgellm.export import export  # noqa: E402
from edgellm.runtimes.providers import resolve_provider  # noqa: E402
from edgellm.runtimes.session import DecoderSession, KVLayout  # noqa: E402


def _session(bundle, role="target"):
    m = read_manifest(bundle)
    e = m.models[role]
    layout = KVLayout(e.num_layers, e.num_kv_heads, e.head_dim, e.max_context, e.vocab_size, e.io)
    return DecoderSession(bundle / e.graph, layout, resolve_provider("cpu"), threads=1)


def _torch_logits(model_dir, ids):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(torch.tensor(ids)[None]).logits[0].numpy()


@pytest.fixture(scope="module", params=["qwen2", "llama"])
def model_dir(request, tmp_path_factory):
    return make_tiny_hf_model(tmp_path_factory.mktemp(request.param), arch=request.param, seed=3)


@pytest.mark.parametrize("quant,tol", [("fp32", 1e-4), ("fp16", 5e-2), ("int8", 0.2), ("int4", 1.0)])
def test_export_matches_torch(model_dir, tmp_path, quant, tol):
    bundle = export(model_dir, output=tmp_path / "b", quant=quant, max_context=128, quality="none")
    ids = np.random.default_rng(0).integers(0, 300, 24)
    ref = _torch_logits(model_dir, ids)
    sess = _session(bundle)
    # prefill, one step, a 5-token verify step, a rollback and a re-run: all must match torch
    got = [sess.forward(ids[:9], 9), sess.forward(ids[9:10], 1), sess.forward(ids[10:15], 5)[:2]]
    sess.rollback(12)
    got.append(sess.forward(ids[12:], 12))
    got = np.concatenate(got)
    assert np.abs(got - ref).max() < tol
    if quant in ("fp32", "fp16"):
        assert (got.argmax(-1) == ref.argmax(-1)).all()
    m = read_manifest(bundle)
    assert m.target.quantization["quant"] == quant
    assert m.draft is None


def test_bundle_manifest_and_quality_report(tiny_bundle):
    m = read_manifest(tiny_bundle)
    assert m.format_version == 1 and set(m.models) == {"target", "draft"}
    assert m.target.io["past_key"] == "past_key_values.%d.key"
    assert m.tokenizer["eos_token_ids"] == [2] and 256 < m.tokenizer["vocab_size"] <= m.target.vocab_size
    assert all(len(f["sha256"]) == 64 for f in m.files.values())
    report = json.loads((tiny_bundle / "quality.json").read_text())
    q = report["models"]["target"]["quantized_vs_fp32"]
    assert q["positions"] > 100 and 0.0 <= q["mean_kl"] < 0.1 and q["top1_agreement"] > 0.8
    assert report["target_within_threshold"] is True
    # round trip: what the runtime parses is what the exporter wrote
    assert json.loads((tiny_bundle / "manifest.json").read_text())["models"]["target"] == m.target.to_dict()
    assert not list(tiny_bundle.parent.glob(".tiny.partial-*"))


def test_full_quality_compares_with_source(tiny_model_dir, tmp_path):
    b = export(tiny_model_dir, output=tmp_path / "b", quant="int8", quality="full", max_context=128)
    r = json.loads((b / "quality.json").read_text())["models"]["target"]
    assert r["fp32_vs_source"]["max_abs_diff"] < 1e-3


def test_mismatched_tokenizers_are_refused_and_leave_nothing(tiny_model_dir, tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["completely different text " * 40],
                            trainers.BpeTrainer(vocab_size=290, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    other = make_tiny_hf_model(tmp_path / "other", tokenizer=tok)
    with pytest.raises(IncompatibleModelsError, match="tokenizer"):
        export(tiny_model_dir, draft=other, output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_bad_inputs_give_clear_errors(tiny_model_dir, tmp_path):
    with pytest.raises(ExportError, match="not found"):
        export(tmp_path / "missing", output=tmp_path / "o1")
    (tmp_path / "notamodel").mkdir()
    with pytest.raises(ExportError, match="config.json"):
        export(tmp_path / "notamodel", output=tmp_path / "o2")
    with pytest.raises(ConfigError, match="allowed"):
        export(tiny_model_dir, output=tmp_path / "o3", quant="int3")
    with pytest.raises(ConfigError, match="block_size"):
        export(tiny_model_dir, output=tmp_path / "o4", block_size=48)
    existing = tmp_path / "exists"
    existing.mkdir()
    (existing / "manifest.json").write_text("{}")
    with pytest.raises(ConfigError, match="overwrite"):
        export(tiny_model_dir, output=existing)
    assert (existing / "manifest.json").read_text() == "{}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exists", "notamodel"]


def test_draft_lm_head_quant_sets_the_drafts_head_and_keeps_the_output(tiny_model_dir, tmp_path):
    import edgellm
    from edgellm.bundle import read_manifest

    out = export(tiny_model_dir, draft=tiny_model_dir, output=tmp_path / "b", max_context=128, quality="none",
                 draft_lm_head_quant="int4")
    m = read_manifest(out)
    assert m.draft.quantization["lm_head_quant"] == "int4" and m.target.quantization["lm_head_quant"] == "int8"
    llm = edgellm.load(out, threads=1)
    t = llm.generate("def foo(x):", mode="target", max_new_tokens=16)
    assert llm.generate("def foo(x):", mode="speculative", max_new_tokens=16).token_ids == t.token_ids
    with pytest.raises(ConfigError, match="draft_lm_head_quant='int4' without a draft"):
        export(tiny_model_dir, output=tmp_path / "c", draft_lm_head_quant="int4")
    with pytest.raises(ConfigError, match="allowed"):
        export(tiny_model_dir, draft=tiny_model_dir, output=tmp_path / "d", draft_lm_head_quant="int3")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_overwrite_replaces_a_bundle(tiny_model_dir, tmp_path):
    out = tmp_path / "b"
    export(tiny_model_dir, output=out, quant="fp16", quality="none", max_context=64)
    export(tiny_model_dir, output=out, quant="int8", quality="none", max_context=64, overwrite=True)
    assert read_manifest(out).target.quantization["quant"] == "int8"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]


def test_offline_hub_id_fails_cleanly(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ExportError, match="hub"):
        export("nobody-here/not-a-model-xyz", output=tmp_path / "o")
    assert not (tmp_path / "o").exists()


def test_ort_mobile_graphs_run_and_match(model_dir, tmp_path):
    """--ort-mobile: .ort graphs plus the operator list an app's minimal onnxruntime needs."""
    import edgellm

    out = export(model_dir, draft=model_dir, output=tmp_path / "b", quant="int4", max_context=128,
                 quality="none", ort_mobile=True)
    m = read_manifest(out)
    assert m.target.ort_graph == "target/model.ort" and m.draft.ort_graph == "draft/model.ort"
    config = (out / "required_operators.config").read_text()
    assert "com.microsoft;1;" in config and "MatMulNBits" in config and str(tmp_path) not in config
    prompt = "def foo(x): return"
    ref = edgellm.load(out, threads=1).generate(prompt, mode="target", max_new_tokens=10).token_ids
    ort_llm = edgellm.load(out, threads=1, graph_format="ort")
    assert ort_llm.generate(prompt, mode="target", max_new_tokens=10).token_ids == ref
    assert ort_llm.generate(prompt, mode="speculative", max_new_tokens=10).token_ids == ref


def test_ort_mobile_npu_bundle_has_the_step_graph_too(model_dir, tmp_path):
    import edgellm

    out = export(model_dir, draft=model_dir, output=tmp_path / "b", max_context=96, quality="none",
                 target_device="npu", npu_window=4, ort_mobile=True)
    m = read_manifest(out)
    assert m.draft.ort_step_graph == "draft/step.ort" and (out / m.draft.ort_step_graph).is_file()
    prompt = "def foo(x): return"
    ref = edgellm.load(out, threads=1).generate(prompt, mode="target", max_new_tokens=10).token_ids
    ort_llm = edgellm.load(out, threads=1, graph_format="ort")
    assert ort_llm.draft.session.step_session is not None
    assert ort_llm.generate(prompt, mode="speculative", max_new_tokens=10).token_ids == ref


def test_graph_format_errors(tiny_bundle):
    import edgellm

    with pytest.raises(ConfigError, match="no .ort graph"):
        edgellm.load(tiny_bundle, graph_format="ort")
    with pytest.raises(ConfigError, match="graph_format='tflite'"):
        edgellm.load(tiny_bundle, graph_format="tflite")


def test_npu_export_static_graphs_match_and_decode_exactly(model_dir, tmp_path):
    """--target-device npu: fixed shapes, standard operators only, the cache written by position."""
    import onnx

    import edgellm

    out = export(model_dir, draft=model_dir, output=tmp_path / "npu", max_context=96, target_device="npu",
                 npu_window=4)
    m = read_manifest(out)
    assert m.target.kv_layout["kind"] == "static_window" and m.target.kv_layout["window"] == 4
    assert m.target.kv_layout["attention_mask"] == "indicator"  # 1 = masked; each layer scales it
    graph = onnx.load(str(out / m.target.graph), load_external_data=False)
    assert {n.domain for n in graph.graph.node} <= {"", "ai.onnx"}  # no contrib operators
    for value in list(graph.graph.input) + list(graph.graph.output):
        assert all(d.dim_value > 0 for d in value.type.tensor_type.shape.dim), value.name  # no dynamic dims
    report = json.loads((out / "quality.json").read_text())["models"]
    q = report["target"]["npu_graph_vs_fp32"]
    assert q["top1_agreement"] == 1.0 and q["max_abs_diff"] < 1e-3
    # the draft also has a one-token step graph that reads the window graph's weights
    assert m.target.step_graph is None and m.draft.step_graph == "draft/step.onnx"
    step = onnx.load(str(out / m.draft.step_graph), load_external_data=False)
    assert step.graph.input[0].type.tensor_type.shape.dim[1].dim_value == 1
    assert not (out / "draft" / "step.onnx.data").exists()  # every weight is shared
    assert report["draft"]["npu_step_graph_vs_fp32"]["top1_agreement"] == 1.0
    llm = edgellm.load(out, threads=1)
    assert llm.draft.session.step_session is not None and llm.target.session.step_session is None
    prompt = "def foo(x): return"
    ref = llm.generate(prompt, mode="target", max_new_tokens=14).token_ids
    for mode in ("speculative", "lookup"):
        assert llm.generate(prompt, mode=mode, max_new_tokens=14).token_ids == ref, mode
    stats = llm.generate(prompt, mode="speculative", max_new_tokens=14).stats
    assert stats["acceptance_rate"] == 1.0  # the draft's step graph agrees with the target's window graph
    cpu = export(model_dir, output=tmp_path / "cpu", quant="fp32", max_context=96, quality="none")
    assert edgellm.load(cpu, threads=1).generate(prompt, mode="target", max_new_tokens=14).token_ids == ref


def test_gpu_export_computes_in_fp16_and_decodes_exactly(model_dir, tmp_path):
    """--target-device gpu: fp16 activations and cache, int4 weights with fp16 scales; runs on the CPU EP too."""
    import onnx
    from onnx import TensorProto

    import edgellm

    out = export(model_dir, draft=model_dir, output=tmp_path / "gpu", max_context=96, target_device="gpu",
                 quality="none")
    m = read_manifest(out)
    assert m.target.kv_layout["dtype"] == "float16" and m.target.quantization["activations"] == "fp16"
    assert m.target.quantization["quant"] == "int4"  # auto = int4 weights
    graph = onnx.load(str(out / m.target.graph), load_external_data=False).graph
    types = {v.name: v.type.tensor_type.elem_type for v in list(graph.input) + list(graph.output)}
    assert types["past_key_values.0.key"] == TensorProto.FLOAT16 and types["logits"] == TensorProto.FLOAT
    scales = {t.name: t.data_type for t in graph.initializer if t.name.endswith(".scales")}
    assert scales and set(scales.values()) == {TensorProto.FLOAT16}
    # fp16 arithmetic alone (fp16 weights) costs next to nothing against the fp32 graph
    fp16 = export(model_dir, draft=model_dir, output=tmp_path / "fp16", max_context=96, target_device="gpu",
                  quant="fp16", draft_quant="fp16")
    q = json.loads((fp16 / "quality.json").read_text())["models"]["target"]["quantized_vs_fp32"]
    assert q["top1_agreement"] >= 0.98 and q["mean_kl"] < 1e-3
    prompt = "def foo(x): return"
    for bundle in (out, fp16):
        llm = edgellm.load(bundle, threads=1)
        assert llm.target.session.cache_array(0).dtype == np.float16
        ref = llm.generate(prompt, mode="target", max_new_tokens=14)
        for mode in ("speculative", "lookup"):
            assert llm.generate(prompt, mode=mode, max_new_tokens=14).token_ids == ref.token_ids, (bundle, mode)
    # a draft stored like the target (fp16 weights) is the target: it must be accepted everywhere
    assert llm.generate(prompt, mode="speculative", max_new_tokens=14).stats["acceptance_rate"] == 1.0
    with pytest.raises(ConfigError, match="quant='fp32' with target_device='gpu'"):
        export(model_dir, output=tmp_path / "x", quant="fp32", target_device="gpu")


def test_npu_export_refuses_quantization_it_cannot_do_yet(model_dir, tmp_path):
    with pytest.raises(ConfigError, match="npu graphs take their precision from npu_quant"):
        export(model_dir, output=tmp_path / "b", quant="int4", target_device="npu")
    with pytest.raises(ConfigError, match="target_device='tpu'"):
        export(model_dir, output=tmp_path / "b", target_device="tpu")


def test_npu_qdq_export_is_calibrated_and_exact(model_dir, tmp_path):
    """--npu-quant qdq: QuantizeLinear/DequantizeLinear with scales calibrated on the sample text."""
    import onnx

    import edgellm

    from onnx import TensorProto

    text = tmp_path / "calibration.py"
    text.write_text("def mean(xs):\n    return sum(xs) / len(xs)\n\n" * 20)
    out = export(model_dir, draft=model_dir, output=tmp_path / "qdq", max_context=96, target_device="npu",
                 npu_window=4, npu_quant="qdq", npu_draft_quant="qdq-w4", calibration_text=text)
    m = read_manifest(out)
    assert m.target.quantization["calibration_text"] == "calibration.py"
    # the target's weights are uint8, the draft's int4 (quantize the draft hard, guard the target)
    for entry, wtype in ((m.target, TensorProto.UINT8), (m.draft, TensorProto.INT4)):
        graph = onnx.load(str(out / entry.graph), load_external_data=False).graph
        inits = {t.name: t.data_type for t in graph.initializer}
        weights = [inits[n.input[0]] for n in graph.node if n.op_type == "DequantizeLinear"
                   and n.input[0].endswith(".weight_quantized") and "norm" not in n.input[0]]  # the linear layers
        assert weights and set(weights) == {wtype}, entry.role
    assert m.draft.quantization["quant"] == "qdq-w4" and m.draft.quantization["weights"] == "int4"
    assert m.target.quantization["quant"] == "qdq" and m.target.quantization["calibration_tokens"] > 0
    # the target's down projections stay float (fp16 weights); the draft is quantized throughout
    assert m.target.quantization["float_layers"] and not m.draft.quantization["float_layers"]
    # each layer's mask is fitted to its calibrated scores: far below them, no further (uint16 range)
    masks = m.target.quantization["mask_values"]
    assert len(masks) == m.target.num_layers and all(-1e4 < v < -100 for v in masks)
    ops = {n.op_type for n in onnx.load(str(out / m.target.graph), load_external_data=False).graph.node}
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul", "Softmax"} <= ops
    q = json.loads((out / "quality.json").read_text())["models"]["target"]
    assert q["quantization"]["quant"] == "qdq" and q["npu_graph_vs_fp32"]["top1_agreement"] >= 0.9
    # the draft's step graph is quantized too (its own calibration) and its weights came out
    # identical to the window graph's, so it stores none of its own
    step = onnx.load(str(out / m.draft.step_graph), load_external_data=False)
    assert "QuantizeLinear" in {n.op_type for n in step.graph.node}
    assert not (out / "draft" / "step.onnx.data").exists()
    llm = edgellm.load(out, threads=1)
    prompt = "def foo(x): return"
    ref = llm.generate(prompt, mode="target", max_new_tokens=12).token_ids
    assert llm.generate(prompt, mode="speculative", max_new_tokens=12).token_ids == ref
    with pytest.raises(ConfigError, match="npu_quant='int2'"):
        export(model_dir, output=tmp_path / "x", target_device="npu", npu_quant="int2")
    with pytest.raises(ConfigError, match="does not write any"):
        export(model_dir, output=tmp_path / "x", npu_quant="qdq")
    for device in ("npu", "cpu"):
        with pytest.raises(ConfigError, match="read by QDQ quantization only"):
            export(model_dir, output=tmp_path / "x", target_device=device, calibration_text=text)
    with pytest.raises(ConfigError, match="nothing.txt.*cannot read"):
        export(model_dir, output=tmp_path / "x", target_device="npu", npu_quant="qdq",
               calibration_text=tmp_path / "nothing.txt")


def test_quality_judge_warns_about_a_damaged_target_or_a_useless_draft():
    from edgellm.export.report import judge as _judge

    def report(target, draft, key="npu_graph_vs_fp32"):
        quant = {"quant": "qdq" if key == "npu_graph_vs_fp32" else "int4", "block_size": 32}
        return {"models": {"target": {key: {"top1_agreement": target[0], "mean_kl": target[1], "positions": 8},
                                      "quantization": quant},
                           "draft": {key: {"top1_agreement": draft[0], "mean_kl": draft[1], "positions": 8},
                                     "quantization": quant}}}

    said = []
    with pytest.warns(RuntimeWarning) as caught:
        _judge(report((0.85, 0.29), (0.0, 21.5)), 0.1, said.append)
    messages = [str(w.message) for w in caught]
    assert any("target's quantization costs mean KL 0.2900" in m and "--npu-quant fp32" in m for m in messages)
    assert any("draft's quantization leaves top-1 agreement 0.000" in m for m in messages)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        good = report((0.98, 0.001), (0.9, 0.05), key="quantized_vs_fp32")
        _judge(good, 0.1, said.append)
    assert good["target_within_threshold"] is True


@pytest.mark.parametrize("source, fails", [
    ({"top1_agreement": 1.0, "mean_kl": 1e-11, "max_abs_diff": 7.6e-5}, False),  # the real Gemma 3 270M
    ({"top1_agreement": 1.0, "mean_kl": 2e-4, "max_abs_diff": 5.2}, True),  # Gemma 2 without its soft-cap
    ({"top1_agreement": 0.53, "mean_kl": 0.5, "max_abs_diff": 14.5}, True),  # llama q/k rows misordered
])
def test_full_check_refuses_an_fp32_graph_that_is_not_the_source(source, fails):
    from edgellm.errors import ExportError
    from edgellm.export.report import judge as _judge

    report = {"models": {"target": {"fp32_vs_source": {"positions": 256, **source}}}}
    if fails:
        with pytest.raises(ExportError, match="differs from the source model beyond rounding"):
            _judge(report, 0.1, lambda m: None)
    else:
        _judge(report, 0.1, lambda m: None)


def test_qdq_preparation_keeps_the_fp32_graph_output(model_dir, tmp_path):
    """Fitted mask values leave the logits alone; fp16-stored float layers move them by fp16 rounding only."""
    import onnx

    from edgellm.export.qdq import FLOAT_LAYERS, _keep_float, prepare_for_qdq
    from edgellm.export.quality import static_graph_logits

    out = export(model_dir, output=tmp_path / "npu", max_context=96, target_device="npu", npu_window=4,
                 quality="none")
    entry = read_manifest(out).target.to_dict()
    graph = out / entry["graph"]
    ids = np.arange(3, 40, dtype=np.int64)
    before = static_graph_logits(graph, entry, ids)

    prepared = prepare_for_qdq(graph, entry, ids)
    assert len(prepared.mask_values) == entry["num_layers"] and all(v <= -100 for v in prepared.mask_values.values())
    np.testing.assert_allclose(static_graph_logits(graph, entry, ids), before, rtol=1e-5, atol=1e-5)

    matmuls = _keep_float(graph, FLOAT_LAYERS)
    assert len(matmuls) == entry["num_layers"]
    model = onnx.load(str(graph), load_external_data=False)
    halves = [t for t in model.graph.initializer if t.name.endswith(".down.weight.fp16")]
    assert len(halves) == entry["num_layers"] and {t.data_type for t in halves} == {onnx.TensorProto.FLOAT16}
    np.testing.assert_allclose(static_graph_logits(graph, entry, ids), before, rtol=0, atol=2e-2)


def test_qdq_graph_gives_a_token_the_same_logits_in_any_window(model_dir, tmp_path):
    """Exactness of speculation on QDQ graphs: a token's logits may not depend on whether the tokens
    before it came through the cache or through its own window (their keys share one scale)."""
    from edgellm.runtimes.providers import resolve_provider
    from edgellm.runtimes.static_session import StaticDecoderSession

    out = export(model_dir, output=tmp_path / "qdq", max_context=96, target_device="npu", npu_window=4,
                 npu_quant="qdq", quality="none")
    m = read_manifest(out)
    sess = StaticDecoderSession.from_entry(out / m.target.graph, m.target.to_dict(), resolve_provider("cpu"), 1)
    ids = np.array([5, 17, 3, 99, 42, 7, 61, 12, 8, 30], np.int64)
    sess.forward(ids[:2], 1)
    together = sess.forward(ids[2:6], 4)  # one window of 4
    sess.rollback(2)
    one_by_one = np.concatenate([sess.forward(ids[i : i + 1], 1) for i in range(2, 6)])
    np.testing.assert_array_equal(together, one_by_one)


def test_draft_vocab_keeps_frequent_tokens_and_the_output_exact(model_dir, tmp_path):
    """--draft-vocab N: the draft's head keeps N frequent tokens (+ special ones); output still the target's."""
    import onnx

    import edgellm
    from edgellm.runtimes.graphs import read_token_ids

    corpus = tmp_path / "corpus.txt"
    corpus.write_text("def foo(x): return x + 1\n" * 20)  # few distinct tokens: low coverage, a warning
    with pytest.warns(RuntimeWarning, match="raise --draft-vocab"):
        out = export(model_dir, draft=model_dir, output=tmp_path / "b", max_context=96, draft_quant="fp32",
                     draft_vocab=40, draft_vocab_corpus=corpus)
    m = read_manifest(out)
    dv = m.draft.draft_vocab
    ids = read_token_ids(out / dv["file"], m.draft.vocab_size)
    assert dv["file"] in m.files and dv["size"] == len(ids) >= 40 and "corpus.txt" in dv["corpus"]
    assert set(m.tokenizer["eos_token_ids"]) <= set(ids.tolist())
    logits = onnx.load(str(out / m.draft.graph), load_external_data=False).graph.output[0]
    assert logits.type.tensor_type.shape.dim[-1].dim_value == len(ids)
    q = json.loads((out / "quality.json").read_text())["models"]["draft"]["quantized_vs_fp32"]
    assert 0 < q["draft_vocab_coverage"] <= 1 and q["top1_agreement"] <= q["draft_vocab_coverage"] + 1e-9
    llm = edgellm.load(out, threads=1)
    row = llm.draft.forward(np.array([5, 6, 7]), 1)[0]
    assert row.shape == (m.draft.vocab_size,) and np.isfinite(row[ids]).all()
    assert np.isneginf(np.delete(row, ids)).all()
    prompt = "def foo(x): return"
    ref = llm.generate(prompt, mode="target", max_new_tokens=16).token_ids
    for kw in ({}, {"num_draft_tokens": 3}):
        assert llm.generate(prompt, mode="speculative", max_new_tokens=16, **kw).token_ids == ref
    sampled = [llm.generate(prompt, mode="speculative", max_new_tokens=8, temperature=1.0, seed=s).token_ids
               for s in range(3)]
    assert all(len(t) > 0 for t in sampled)
    # the default keeps every token of a vocabulary smaller than 32768; npu graphs refuse a subset
    assert read_manifest(export(model_dir, draft=model_dir, output=tmp_path / "d", max_context=96,
                                quality="none")).draft.draft_vocab is None
    with pytest.raises(ConfigError, match="draft_vocab=40 with target_device='npu'"):
        export(model_dir, draft=model_dir, output=tmp_path / "n", target_device="npu", draft_vocab=40)
    with pytest.raises(ConfigError, match="draft_vocab=-3"):
        export(model_dir, draft=model_dir, output=tmp_path / "x", draft_vocab=-3)
    assert not (tmp_path / "x").exists()
