"""The generic path: model types without a family record, exported through optimum."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

from helpers import make_tiny_hf_model
from edgellm.errors import ConfigError, ExportError

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
pytest.importorskip("optimum.exporters.onnx")

import edgellm  # noqa: E402
from edgellm.export import export  # noqa: E402
from edgellm.bundle import read_manifest  # noqa: E402

MODELS = {
    "gpt2": lambda: transformers.GPT2Config(vocab_size=320, n_embd=64, n_layer=2, n_head=4, n_positions=256,
                                            eos_token_id=2, bos_token_id=2),
    "stablelm": lambda: transformers.StableLmConfig(vocab_size=320, hidden_size=64, intermediate_size=96,
                                                    num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                                    max_position_embeddings=256, partial_rotary_factor=0.5,
                                                    eos_token_id=2, bos_token_id=2),
}
PROMPTS = [list(range(5, 25)), [7, 300, 4, 9] * 5]


def _tokens(llm, prompt, mode, n=32):
    cfg = dataclasses.replace(llm.decode_config(mode=mode, max_new_tokens=n), eos_token_ids=())
    return [t for r in llm.generate_tokens(prompt, cfg) for t in r.tokens]


@pytest.fixture(scope="module", params=list(MODELS))
def generic(request, tmp_path_factory):
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(MODELS[request.param]())
    with torch.no_grad():  # weights that matter (the default init leaves the output flat)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.15)
    folder = make_tiny_hf_model(tmp_path_factory.mktemp(request.param), model=model)
    bundle = export(folder, draft=folder, output=tmp_path_factory.mktemp("b") / "fp32", quant="fp32",
                    draft_quant="int4", draft_block_size=32, max_context=128, quality="full")
    return request.param, folder, bundle, model.eval()


def test_manifest_says_which_path(generic):
    name, _, bundle, _ = generic
    m = read_manifest(bundle)
    assert m.target.architecture == name and m.target.kv_layout["kind"] == "concat"
    assert m.target.quantization["export_path"] == "generic" and m.draft.quantization["quant"] == "int4"
    assert m.tokenizer["eos_token_ids"] == [2]  # from the folder's generation config, as for native folders
    report = json.loads((bundle / "quality.json").read_text())["models"]
    assert report["target"]["fp32_vs_source"]["max_abs_diff"] < 1e-4


def test_logits_and_greedy_output_match_transformers(generic):
    name, _, bundle, model = generic
    llm = edgellm.load(bundle, threads=1)
    ids = np.random.default_rng(0).integers(3, 300, 24)
    with torch.no_grad():
        ref = model(torch.tensor(ids)[None]).logits[0].numpy()
    sess = llm.target.session
    sess.reset()
    got = [sess.forward(ids[:9], 9), sess.forward(ids[9:10], 1), sess.forward(ids[10:15], 5)[:2]]
    sess.rollback(12)
    got.append(sess.forward(ids[12:], 12))
    np.testing.assert_allclose(np.concatenate(got), ref, atol=1e-4)
    vocab = llm.manifest.tokenizer["vocab_size"]
    for prompt in PROMPTS:
        seq = list(prompt)
        with torch.no_grad():
            for _ in range(24):
                seq.append(int(model(torch.tensor(seq)[None]).logits[0, -1, :vocab].argmax()))
        target = _tokens(llm, prompt, "target", 24)
        assert target == seq[len(prompt):], name
        assert _tokens(llm, prompt, "speculative", 24) == target and _tokens(llm, prompt, "lookup", 24) == target


def test_int4_generic_graph_is_exact_under_speculation(generic, tmp_path):
    name, folder, _, _ = generic
    bundle = export(folder, draft=folder, output=tmp_path / "int4", quant="int4", block_size=32,
                    draft_block_size=32, max_context=128, quality="quant")
    q = json.loads((bundle / "quality.json").read_text())["models"]["target"]["quantized_vs_fp32"]
    assert q["positions"] > 50 and q["mean_kl"] >= 0
    import onnx

    assert read_manifest(bundle).target.quantization["lm_head_quant"] == "int8"  # as native int4 bundles
    nodes = onnx.load(str(bundle / "target" / "model.onnx"), load_external_data=False).graph.node
    bits = {next(a.i for a in n.attribute if a.name == "bits") for n in nodes if n.op_type == "MatMulNBits"}
    head = next(n for n in nodes if "logits" in n.output)
    assert head.op_type == "MatMulNBits" and bits == ({8} if name == "gpt2" else {4, 8})
    # GPT-2's Conv1D layers export as Gemm, which the quantizer leaves fp32: the manifest says so
    assert (read_manifest(bundle).target.quantization["float_matmuls"] > 0) == (name == "gpt2")
    llm = edgellm.load(bundle, threads=1)
    for prompt in PROMPTS:
        ref = _tokens(llm, prompt, "target")
        assert _tokens(llm, prompt, "speculative") == ref and _tokens(llm, prompt, "lookup") == ref, name


def test_what_the_generic_path_cannot_do(generic, tmp_path):
    _, folder, _, _ = generic
    with pytest.raises(ConfigError, match="allowed there: int4, int8, fp32"):
        export(folder, output=tmp_path / "a", quant="fp16", max_context=128)
    with pytest.raises(ExportError, match="no npu graph"):
        export(folder, output=tmp_path / "b", target_device="npu", max_context=128)
    assert not list(tmp_path.iterdir())


def test_a_model_type_nobody_exports_is_refused(tmp_path):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "dbrx", "vocab_size": 10}))
    with pytest.raises(ExportError, match="model_type 'dbrx' has no native graph .* optimum cannot export it"):
        export(tmp_path / "m", output=tmp_path / "out")
    assert not (tmp_path / "out").exists()
