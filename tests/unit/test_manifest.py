"""Manifest validation: the runtime refuses what it cannot read safely."""

from __future__ import annotations

import copy

import pytest

from edgellm.errors import BundleError, ManifestError
from edgellm.bundle import read_manifest
from edgellm.manifest import parse_manifest, safe_relpath

IO = {"input_ids": "input_ids", "num_logits": "num_logits", "seqlens_k": "seqlens_k",
      "total_sequence_length": "total_sequence_length", "past_key": "past_key_values.%d.key",
      "past_value": "past_key_values.%d.value", "present_key": "present.%d.key",
      "present_value": "present.%d.value", "logits": "logits", "num_layers": 2}
MODEL = {"graph": "target/model.onnx", "architecture": "qwen2", "num_layers": 2, "num_heads": 4,
         "num_kv_heads": 2, "head_dim": 16, "vocab_size": 320, "max_context": 256,
         "kv_layout": {"kind": "shared_buffer"}, "io": IO, "quantization": {"quant": "int4"}}
DOC = {"format_version": 1, "models": {"target": MODEL},
       "tokenizer": {"file": "tokenizer/tokenizer.json", "vocab_size": 300},
       "files": {"target/model.onnx": {"sha256": "0" * 64, "size": 1},
                 "tokenizer/tokenizer.json": {"sha256": "0" * 64, "size": 1}}}


def test_valid_manifest_parses():
    m = parse_manifest(DOC)
    assert m.target.num_layers == 2 and m.draft is None


@pytest.mark.parametrize("mutate,match", [
    (lambda d: d.update(format_version=2), "format_version 2 is not supported"),
    (lambda d: d.update(format_version="1"), "must be an integer"),
    (lambda d: d["models"].pop("target"), "target"),
    (lambda d: d["models"].update(helper=MODEL), "unknown roles"),
    (lambda d: d["models"]["target"].pop("io"), "missing io"),
    (lambda d: d["models"]["target"].update(num_layers=0), "positive integer"),
    (lambda d: d["models"]["target"].update(graph="/etc/passwd"), "leaves the bundle"),
    (lambda d: d["models"]["target"].update(graph="a/../../x"), "leaves the bundle"),
    (lambda d: d["tokenizer"].update(file="..\\\\x"), "leaves the bundle"),
    (lambda d: d["files"].pop("target/model.onnx"), "not listed"),
    (lambda d: d["models"]["target"]["kv_layout"].update(kind="dynamic"), "shared_buffer"),
    (lambda d: d["models"]["target"]["kv_layout"].update(dtype="bfloat16"), "reads float32, float16"),
    (lambda d: d["models"]["target"].update(step_graph="../step.onnx"), "models.target.step_graph"),
    (lambda d: d["models"]["target"].update(step_graph="target/step.onnx"), "step_graph 'target/step.onnx' is not listed"),
    (lambda d: d["models"]["target"].update(batch_graph="target/batch.onnx"), "batch_slots"),
    (lambda d: d["models"]["target"].update(batch_graph="../b.onnx", batch_slots=4), "leaves the bundle"),
    (lambda d: d["models"]["target"].update(batch_graph="target/batch.onnx", batch_slots=4), "is not listed"),
    (lambda d: d["models"]["target"].update(batch_graph="target/batch.onnx", batch_slots=65), "batch_slots"),
])
def test_invalid_manifests_are_refused(mutate, match):
    doc = copy.deepcopy(DOC)
    mutate(doc)
    with pytest.raises(ManifestError, match=match):
        parse_manifest(doc)


def test_read_manifest_errors(tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        read_manifest(tmp_path / "missing")
    with pytest.raises(BundleError, match="no manifest.json"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)


def test_safe_relpath():
    assert safe_relpath("a/b.onnx", "x") == "a/b.onnx"
    for bad in ("", "/abs", "../up", "c:/x", 5):
        with pytest.raises(ManifestError):
            safe_relpath(bad, "x")


LORA = {"sites": {"l0.qkv": [64, 128]}, "dtype": "float32"}
ADAPTER = {"target": "adapters/a.npz", "rank": 4}


def _with_adapter(**changes):
    d = copy.deepcopy(DOC)
    d["models"]["target"]["lora"] = copy.deepcopy(LORA)
    d["adapters"] = {"a": dict(ADAPTER)}
    d["files"]["adapters/a.npz"] = {"sha256": "0" * 64, "size": 1}
    for path, value in changes.items():
        *keys, last = path.split("/")
        node = d
        for k in keys:
            node = node[k]
        node[last] = value
    return d


def test_manifest_with_an_adapter_parses():
    m = parse_manifest(_with_adapter())
    assert m.adapters["a"]["target"] == "adapters/a.npz" and m.target.lora["sites"]["l0.qkv"] == [64, 128]
    assert parse_manifest(m.to_dict()).adapters == m.adapters


@pytest.mark.parametrize("changes,match", [
    ({"adapters/a/target": "../a.npz"}, "leaves the bundle"),
    ({"adapters/a/target": "adapters/b.npz"}, "not listed in 'files'"),
    ({"adapters/a b": ADAPTER}, "name 'a b'"),
    ({"adapters/a": "adapters/a.npz"}, "expected an object naming its 'target'"),
    ({"models/target/lora": None}, "the target graph has no LoRA branches"),
    ({"models/target/lora": {"sites": {"l0.lm_head": [1, 2]}, "dtype": "float32"}}, "expected a site like"),
    ({"models/target/lora": {"sites": {"l0.qkv": [64, 0]}, "dtype": "float32"}}, "positive integer"),
    ({"models/target/lora": {"sites": {"l0.qkv": [64, 2]}, "dtype": "int8"}}, "'dtype': 'float32'"),
    ({"models/target/kv_layout": {"kind": "concat"}}, "needs the names|only a graph with a shared_buffer"),
])
def test_invalid_adapter_blocks_are_refused(changes, match):
    with pytest.raises(ManifestError, match=match):
        parse_manifest(_with_adapter(**changes))
