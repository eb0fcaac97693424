"""Manifest validation: the runtime refuses what it cannot read safely."""

from __future__ import annotations

import copy

import pytest

from edgellm.errors import BundleError, ManifestError
from edgellm.manifest import parse_manifest, read_manifest, safe_relpath

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
