"""LoRA adapters: PEFT folders exported over one base, switched per request, exact against PEFT."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

PROMPT = "def foo(x): return"
N = 24


def make_adapter(base: Path, out: Path, seed: int, b_std: float = 0.15, **lora) -> Path:
    """A random PEFT LoRA adapter over the model in ``base`` (B is random too, unlike PEFT's init; small,
    as a fine-tune's change is, so that rounding does not decide near-ties)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(task_type="CAUSAL_LM", **lora))
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0, 0.3 if "lora_A" in name else b_std)
    model.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    return {
        "qv": make_adapter(tiny_model_dir, root / "qv", 1, b_std=0.6, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]),
        # every projection, rsLoRA scaling, one module with its own rank and alpha
        "all": make_adapter(tiny_model_dir, root / "all", 2, r=2, lora_alpha=4, use_rslora=True,
                            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], rank_pattern={"down_proj": 3},
                            alpha_pattern={"o_proj": 1}),
    }


@pytest.fixture(scope="module")
def lora_bundle(tiny_model_dir, adapters, tmp_path_factory):
    from edgellm.export import export

    out = tmp_path_factory.mktemp("lora") / "bundle"
    # the draft is the target model: with the same adapter on both ("qv"), it proposes the target's tokens
    return export(tiny_model_dir, output=out, draft=tiny_model_dir, quant="fp32", draft_quant="fp32",
                  max_context=256, quality="full", lora={k: str(v) for k, v in adapters.items()},
                  draft_lora={"qv": adapters["qv"]})


@pytest.fixture(scope="module")
def llm(lora_bundle):
    import edgellm

    return edgellm.load(lora_bundle, threads=1, prompt_cache_bytes=8 * 2**20)


def peft_greedy(base: Path, adapter: Path | None, ids: list[int], n: int, vocab: int) -> list[int]:
    """transformers' greedy tokens with the adapter merged into the weights by PEFT (over the
    tokenizer's ``vocab`` tokens, as edgellm decodes: the model's logits are wider)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    if adapter is not None:
        model = peft.PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, eos_token_id=None,
                         pad_token_id=0, suppress_tokens=list(range(vocab, model.config.vocab_size)))
    return out[0, len(ids):].tolist()


@pytest.mark.parametrize("name", ["qv", "all", None])
def test_greedy_output_equals_transformers_with_peft_merged(llm, tiny_model_dir, adapters, name):
    ids = llm.prompt_ids(PROMPT)
    want = peft_greedy(tiny_model_dir, adapters.get(name), ids, N, llm.tokenizer.vocab_size)
    got = llm.generate(PROMPT, max_new_tokens=N, mode="target", adapter=name)
    eos = set(llm.tokenizer.eos_token_ids)
    want = want[: next((i for i, t in enumerate(want) if t in eos), len(want))]
    assert got.token_ids == want
    assert got.stats["adapter"] == name


def test_adapters_change_the_output(llm):
    outs = {name: llm.generate(PROMPT, max_new_tokens=N, mode="target", adapter=name).token_ids
            for name in ("qv", "all", None)}
    assert len({tuple(v) for v in outs.values()}) == 3


@pytest.mark.parametrize("mode", ["speculative", "lookup"])
def test_speculative_and_lookup_equal_target_with_each_adapter(llm, mode):
    for name in ("qv", "all"):
        want = llm.generate(PROMPT, max_new_tokens=N, mode="target", adapter=name).token_ids
        got = llm.generate(PROMPT, max_new_tokens=N, mode=mode, adapter=name)
        assert got.token_ids == want, (mode, name)
    if mode == "speculative":  # the draft is the target model; "all" has no draft adapter, "qv" has the same
        assert llm.generate(PROMPT, max_new_tokens=N, mode=mode).stats["acceptance_rate"] == 1.0
        assert llm.generate(PROMPT, max_new_tokens=N, mode=mode, adapter="qv").stats["acceptance_rate"] == 1.0
        assert llm.generate(PROMPT, max_new_tokens=N, mode=mode, adapter="all").stats["acceptance_rate"] < 1.0


def test_adapters_alternate_in_one_loaded_bundle(llm):
    prompt = " ".join([PROMPT] * 8)  # long enough for the prompt cache to keep each adapter's conversation
    solo = {name: llm.generate(prompt, max_new_tokens=N, adapter=name, cache_prompt=False).token_ids
            for name in ("qv", "all", None)}
    session = llm.target.session
    cached = []
    for name in ["qv", "all", "qv", None, "all", None, "qv"]:
        r = llm.generate(prompt, max_new_tokens=N, adapter=name)  # never another adapter's cached keys
        assert r.token_ids == solo[name], name
        cached.append(r.stats["cached_tokens"])
    assert llm.target.session is session  # nothing reloaded
    assert cached[0] == 0 and all(c > 0 for c in cached[2:])  # each adapter's own prompt, from the cache


def test_unknown_adapter_is_a_clear_error(llm):
    from edgellm.errors import ConfigError

    with pytest.raises(ConfigError, match=r"adapter='nope' is not in this bundle; its adapters: all, qv"):
        llm.generate(PROMPT, max_new_tokens=2, adapter="nope")


def test_manifest_and_quality_report(lora_bundle):
    import onnx

    m = json.loads((lora_bundle / "manifest.json").read_text())
    assert sorted(m["adapters"]) == ["all", "qv"]
    assert m["adapters"]["qv"]["target_modules"] == ["q_proj", "v_proj"]
    assert m["adapters"]["qv"]["target"] in m["files"] and m["adapters"]["qv"]["draft"] in m["files"]
    assert "draft" not in m["adapters"]["all"]
    assert sorted(m["models"]["target"]["lora"]["sites"]) == sorted(
        f"l{i}.{r}" for i in range(2) for r in ("qkv", "o", "gate_up", "down"))
    assert sorted(m["models"]["draft"]["lora"]["sites"]) == ["l0.qkv", "l1.qkv"]
    q = json.loads((lora_bundle / "quality.json").read_text())["models"]["target"]["adapters"]
    for name in ("qv", "all"):
        assert q[name]["fp32_vs_source"]["top1_agreement"] == 1.0
        assert q[name]["fp32_vs_source"]["max_abs_diff"] < 1e-3
    assert q["qv"]["quantized_vs_fp32"]["max_abs_diff"] == 0.0  # fp32 graphs
    draft_q = json.loads((lora_bundle / "quality.json").read_text())["models"]["draft"]["adapters"]
    assert draft_q["qv"]["fp32_vs_source"]["top1_agreement"] == 1.0


def test_add_lora_to_a_bundle_gives_the_same_output(tiny_model_dir, adapters, lora_bundle, llm, tmp_path):
    import onnx

    import edgellm
    from edgellm.errors import ConfigError
    from edgellm.export import add_lora, export

    plain = export(tiny_model_dir, output=tmp_path / "plain", quant="fp32", max_context=256, quality="none")
    graph = onnx.load(str(plain / "target" / "model.onnx"), load_external_data=False)
    assert not [i.name for i in graph.graph.input if i.name.startswith("lora.")]  # no branch, no cost
    before = edgellm.load(plain, threads=1).generate(PROMPT, max_new_tokens=N, mode="target").token_ids
    add_lora(plain, {"qv": adapters["qv"]})
    add_lora(plain, [f"all={adapters['all']}"])  # more sites: the graph gets the rest of its branches
    with pytest.raises(ConfigError, match="draft_lora without a draft model"):
        add_lora(plain, {"x": adapters["qv"]}, draft_lora={"x": adapters["qv"]})
    loaded = edgellm.load(plain, threads=1)
    assert loaded.generate(PROMPT, max_new_tokens=N, mode="target").token_ids == before  # zero-rank branches
    for name in ("qv", "all"):
        assert loaded.generate(PROMPT, max_new_tokens=N, mode="target", adapter=name).token_ids == \
            llm.generate(PROMPT, max_new_tokens=N, mode="target", adapter=name).token_ids
    batched = edgellm.load(plain, threads=1, max_batch=2)  # add_lora rebuilt its batch graph with the LoRA inputs
    assert batched.generate(PROMPT, max_new_tokens=N, mode="target", adapter="all").token_ids == \
        loaded.generate(PROMPT, max_new_tokens=N, mode="target", adapter="all").token_ids
    assert not list(tmp_path.glob(".plain.*"))  # no partial or old copies left beside it


def test_add_lora_refuses_a_name_it_has(lora_bundle, adapters):
    from edgellm.errors import ConfigError
    from edgellm.export import add_lora

    before = (lora_bundle / "manifest.json").read_bytes()
    with pytest.raises(ConfigError, match="has an adapter named 'qv' already"):
        add_lora(lora_bundle, {"qv": adapters["qv"]})
    assert (lora_bundle / "manifest.json").read_bytes() == before


def _other_base(tmp_path) -> Path:
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(5)
    cfg = Qwen2Config(vocab_size=320, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path / "other")
    return tmp_path / "other"


@pytest.mark.filterwarnings("ignore::UserWarning")  # PEFT's, about LoRA on a tied embedding
def test_mismatched_adapters_are_refused_and_nothing_is_written(tiny_model_dir, tmp_path):
    from edgellm.errors import ConfigError, ExportError
    from edgellm.export import export

    other = make_adapter(_other_base(tmp_path), tmp_path / "other-lora", 3, r=2, target_modules=["q_proj"])
    head = tmp_path / "head-lora"  # LoRA on the LM head (PEFT saves a tied one with the whole embedding)
    head.mkdir()
    (head / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2, "lora_alpha": 2,
                                                          "target_modules": ["lm_head"]}))
    from safetensors.numpy import save_file

    save_file({"base_model.model.lm_head.lora_A.weight": np.ones((2, 64), np.float32),
               "base_model.model.lm_head.lora_B.weight": np.ones((320, 2), np.float32)},
              str(head / "adapter_model.safetensors"))
    embed = make_adapter(tiny_model_dir, tmp_path / "embed-lora", 3, r=2, target_modules=["embed_tokens"])
    dora = make_adapter(tiny_model_dir, tmp_path / "dora", 3, r=2, target_modules=["q_proj"], use_dora=True)
    cases = [(other, r"q_proj has lora_A \[2, 32\].*another base model"),
             (head, r"it changes 'lm_head', which this base has no LoRA site for"),
             (dora, r"use_dora=True: DoRA"),
             (embed, r"embed_tokens.* is not a LoRA A/B matrix \(embedding LoRA"),
             (tmp_path, r"not a PEFT adapter folder")]
    for folder, message in cases:
        out = tmp_path / "bundle"
        with pytest.raises(ExportError, match=message):
            export(tiny_model_dir, output=out, quant="fp32", max_context=128, quality="none",
                   lora={"x": str(folder)})
        assert not out.exists() and not list(tmp_path.glob(".bundle.*"))
    with pytest.raises(ConfigError, match="adapter name 'a b'"):
        export(tiny_model_dir, output=tmp_path / "bundle", lora=["a b=" + str(head)])
    with pytest.raises(ConfigError, match="NAME=PATH"):
        export(tiny_model_dir, output=tmp_path / "bundle", lora=[str(head)])
    with pytest.raises(ConfigError, match="draft_lora names 'y', which is not an adapter of the target"):
        export(tiny_model_dir, output=tmp_path / "bundle", draft=tiny_model_dir, lora={"x": head},
               draft_lora={"y": head})


def test_rank_that_disagrees_with_the_config_is_refused(tiny_model_dir, adapters, tmp_path):
    import shutil

    from edgellm.errors import ExportError
    from edgellm.export.lora import read_adapter, sites
    from edgellm.export.source import open_source

    bad = tmp_path / "bad"
    shutil.copytree(adapters["qv"], bad)
    cfg = json.loads((bad / "adapter_config.json").read_text())
    (bad / "adapter_config.json").write_text(json.dumps(cfg | {"r": 5}))
    with pytest.raises(ExportError, match="has rank 4, its adapter_config.json says 5"):
        read_adapter("bad", bad, sites(open_source(tiny_model_dir).spec))


def test_fused_site_stacks_modules_with_their_scales(tiny_model_dir, adapters):
    from edgellm.export.lora import read_adapter, sites
    from edgellm.export.source import open_source, safetensors_index, safetensors_tensor

    a = read_adapter("qv", adapters["qv"], sites(open_source(tiny_model_dir).spec))
    idx = safetensors_index([adapters["qv"] / "adapter_model.safetensors"])
    t = lambda k: safetensors_tensor(idx[f"base_model.model.model.layers.0.self_attn.{k}.weight"], k)  # noqa: E731
    x = np.random.default_rng(0).normal(size=(3, 64)).astype(np.float32)
    delta = x @ a.arrays["l0.qkv.a"] @ a.arrays["l0.qkv.b"]  # (3, q 64 + k 32 + v 32)
    np.testing.assert_allclose(delta[:, :64], 2.0 * x @ t("q_proj.lora_A").T @ t("q_proj.lora_B").T, rtol=1e-5)
    np.testing.assert_array_equal(delta[:, 64:96], 0)  # k untouched
    np.testing.assert_allclose(delta[:, 96:], 2.0 * x @ t("v_proj.lora_A").T @ t("v_proj.lora_B").T, rtol=1e-5)
    assert a.site_tags == ["l0.qkv", "l1.qkv"]


def test_server_model_field_selects_the_adapter(llm):
    pytest.importorskip("starlette")
    from starlette.testclient import TestClient

    from edgellm.server import create_app

    client = TestClient(create_app(llm, model_id="tiny"), base_url="http://127.0.0.1")
    models = client.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == ["tiny", "all", "qv"]
    assert models[2]["edgellm"]["lora"]["target_modules"] == ["q_proj", "v_proj"]
    for name in ("qv", "all", "tiny"):
        r = client.post("/v1/completions", json={"model": name, "prompt": PROMPT, "max_tokens": N, "temperature": 0})
        assert r.status_code == 200, r.text
        want = llm.generate(PROMPT, max_new_tokens=N, adapter=None if name == "tiny" else name).text
        assert r.json()["choices"][0]["text"] == want and r.json()["model"] == name
    r = client.post("/v1/chat/completions", json={"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 404
    assert r.json()["error"] == {"message": "The model `gpt-4o` does not exist; this server has: tiny, all, qv "
                                            "(GET /v1/models)", "type": "invalid_request_error", "param": "model",
                                 "code": "model_not_found"}


def test_cli_generate_adapter_and_add_lora(lora_bundle, llm, adapters, tmp_path):
    import shutil

    from click.testing import CliRunner

    from edgellm.cli import cli

    r = CliRunner().invoke(cli, ["generate", str(lora_bundle), PROMPT, "--adapter", "qv", "--json", "--mode", "target",
                                 "--max-new-tokens", str(N), "--threads", "1"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.output.strip().splitlines()[-1])["token_ids"] == \
        llm.generate(PROMPT, max_new_tokens=N, mode="target", adapter="qv").token_ids
    copy = tmp_path / "copy"
    shutil.copytree(lora_bundle, copy)
    r = CliRunner().invoke(cli, ["add-lora", str(copy), f"qv2={adapters['qv']}", "--draft-lora",
                                 f"qv2={adapters['qv']}"])
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["add-lora", str(copy), f"qv={adapters['all']}", "--replace"])  # drops its draft part
    assert r.exit_code == 0, r.output
    m = json.loads((copy / "manifest.json").read_text())
    assert "draft" not in m["adapters"]["qv"] and not (copy / "adapters" / "qv.draft.npz").exists()
    assert "adapters/qv.draft.npz" not in m["files"] and "adapters/qv2.draft.npz" in m["files"]
    import edgellm

    got = edgellm.load(copy, threads=1).generate(PROMPT, max_new_tokens=N, mode="speculative", adapter="qv2")
    assert got.stats["acceptance_rate"] == 1.0
    r = CliRunner().invoke(cli, ["inspect", str(copy)])
    assert r.exit_code == 0 and "adapter qv2: LoRA rank 4 on q_proj, v_proj" in r.output, r.output
    r = CliRunner().invoke(cli, ["add-lora", str(copy), "no-equals-sign"])
    assert r.exit_code != 0 and "NAME=PATH" in str(r.exception or r.output)


def test_gpu_bundle_branches_compute_in_fp16(tiny_model_dir, adapters, tmp_path):
    """--target-device gpu: the branches take fp16 matrices (runs on the CPU EP too), exact speculation."""
    import edgellm
    from edgellm.export import export

    out = export(tiny_model_dir, draft=tiny_model_dir, output=tmp_path / "gpu", max_context=128, target_device="gpu",
                 quant="fp16", draft_quant="fp16", lora={"qv": adapters["qv"]})
    m = json.loads((out / "manifest.json").read_text())
    assert m["models"]["target"]["lora"]["dtype"] == "float16"
    q = json.loads((out / "quality.json").read_text())["models"]["target"]["adapters"]["qv"]["quantized_vs_fp32"]
    assert q["top1_agreement"] >= 0.95 and q["mean_kl"] < 1e-2
    llm = edgellm.load(out, threads=1)
    ref = llm.generate(PROMPT, mode="target", max_new_tokens=N, adapter="qv")
    assert ref.token_ids != llm.generate(PROMPT, mode="target", max_new_tokens=N).token_ids
    for mode in ("speculative", "lookup"):
        assert llm.generate(PROMPT, mode=mode, max_new_tokens=N, adapter="qv").token_ids == ref.token_ids, mode


@pytest.mark.parametrize("arrays,match", [
    ({"l0.qkv.a": np.zeros(64, np.float32), "l0.qkv.b": np.zeros((1, 128), np.float32)}, "has shape \\[64\\]"),
    ({"l0.qkv.a": np.zeros((64, 2), np.float32)}, "the same r"),
    ({"l0.qkv.a": np.zeros((64, 2), np.float32), "l0.qkv.b": np.zeros((3, 128), np.float32)}, "the same r"),
    ({"l0.lm_head.a": np.zeros((64, 2), np.float32)}, "is not a LoRA site of this graph"),
])
def test_a_damaged_adapter_file_is_a_bundle_error(tmp_path, arrays, match):
    from edgellm.errors import BundleError
    from edgellm.lora import load_adapter

    path = tmp_path / "a.npz"
    np.savez(path, **arrays)
    with pytest.raises(BundleError, match=match):
        load_adapter(path, {"l0.qkv": [64, 128]})
    path.write_bytes(b"not a zip")
    with pytest.raises(BundleError, match="not an adapter archive"):
        load_adapter(path, {"l0.qkv": [64, 128]})


def test_sequences_with_different_adapters_in_flight_at_once(lora_bundle, llm):
    """Batched passes group sequences by adapter (each group one call, its own LoRA inputs):
    every sequence still gets its solo output."""
    import edgellm
    from helpers import run_concurrently

    requests = [(PROMPT, dict(max_new_tokens=N, adapter=name, mode=mode, cache_prompt=False))
                for name, mode in (("qv", "speculative"), (None, "lookup"), ("all", "target"),
                                   ("qv", "target"), ("all", "speculative"))]
    solo = [llm.generate(p, **kw).token_ids for p, kw in requests]
    batched = edgellm.load(lora_bundle, threads=1, max_batch=3)
    assert batched.manifest.target.batch_graph is not None
    assert run_concurrently(batched, requests) == solo
