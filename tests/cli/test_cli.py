"""The CLI through click's CliRunner: help, exit codes, --json output."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from edgellm.cli import cli, main



def run(args):
    return CliRunner().invoke(cli, args)


def test_help_lists_commands():
    r = run(["--help"])
    assert r.exit_code == 0
    for cmd in ("export", "generate", "chat", "bench", "inspect", "providers", "demo", "serve"):
        assert cmd in r.output


def test_generate_json(tiny_bundle):
    r = run(["generate", str(tiny_bundle), "def foo(x): return", "--json", "--max-new-tokens", "12", "--threads", "1"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output.strip().splitlines()[-1])
    assert set(doc) == {"text", "token_ids", "finish_reason", "stats"}
    for k in ("tokens_per_second", "acceptance_rate", "mean_tokens_per_round"):
        assert k in doc["stats"]
    t = run(["generate", str(tiny_bundle), "def foo(x): return", "--json", "--max-new-tokens", "12", "--mode", "target"])
    assert json.loads(t.output.strip().splitlines()[-1])["token_ids"] == doc["token_ids"]


def test_generate_takes_its_default_length_from_the_bundle(tiny_bundle, tmp_path):
    import shutil

    from edgellm.manifest import manifest_digest

    bundle = tmp_path / "b"
    shutil.copytree(tiny_bundle, bundle)
    doc = json.loads((bundle / "manifest.json").read_text())
    assert doc["generation"] == {"max_new_tokens": 256}  # all the runtime reads of it
    doc["generation"]["max_new_tokens"] = 5
    doc["manifest_sha256"] = manifest_digest(doc)
    (bundle / "manifest.json").write_text(json.dumps(doc))
    r = run(["generate", str(bundle), "def foo(x): return", "--json", "--mode", "target", "--threads", "1"])
    assert r.exit_code == 0, r.output
    out = json.loads(r.output.strip().splitlines()[-1])
    assert len(out["token_ids"]) <= 5 and (out["finish_reason"] == "length") == (len(out["token_ids"]) == 5)


def test_inspect_ok_and_tampered(tiny_bundle, tmp_path, capsys):
    r = run(["inspect", str(tiny_bundle), "--json"])
    assert r.exit_code == 0
    doc = json.loads(r.output)
    assert doc["problems"] == [] and set(doc["models"]) == {"target", "draft"}
    import shutil

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "target" / "model.onnx.data", "r+b") as f:
        f.truncate(100)
    assert main(["inspect", str(copy)]) == 1
    err = capsys.readouterr().err
    assert err.startswith("Error:") and "target/model.onnx.data" in err and "Traceback" not in err


def test_errors_map_to_exit_codes(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nope"), "hi"]) == 1
    assert "does not exist" in capsys.readouterr().err
    assert main(["generate"]) == 2
    assert main(["export", "x", "-o", str(tmp_path / "o"), "--quant", "int3"]) == 2


def test_bench_json_is_last_line(tiny_bundle, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def foo(x): return", "category": "code"}\n'
                       '{"messages": [{"role": "user", "content": "hello"}], "category": "chat"}\n')
    r = run(["bench", str(tiny_bundle), "--prompts", str(prompts), "--repeats", "1", "--max-new-tokens", "8",
             "--threads", "1"])
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output.strip().splitlines()[-1])
    rows = {(s["category"], s["mode"]): s for s in doc["summary"]}
    assert rows[("all", "target")]["speedup"] == 1.0
    assert rows[("all", "speculative")]["exact"] and rows[("all", "lookup")]["exact"]


def test_providers_json():
    r = run(["providers", "--json"])
    rows = json.loads(r.output)
    assert {"cpu", "qnn", "coreml"} <= {x["name"] for x in rows}
    assert next(x for x in rows if x["name"] == "cpu")["available"]


def test_demo_dry_run():
    r = run(["demo", "--dry-run"])
    assert r.exit_code == 0 and "sha256" in r.output


def test_serve_bad_bundle_and_port(tmp_path, capsys):
    pytest.importorskip("uvicorn")
    assert main(["serve", str(tmp_path / "nope")]) == 1
    assert "nope" in capsys.readouterr().err
    assert main(["serve", str(tmp_path), "--port", "70000"]) == 1
    assert "port=70000" in capsys.readouterr().err


def test_bench_sampled_reports_speed_and_acceptance_not_exactness(tiny_bundle, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "def foo(x): return", "category": "code"}\n')
    args = ["bench", str(tiny_bundle), "--prompts", str(prompts), "--repeats", "1", "--max-new-tokens", "8",
            "--threads", "1", "--temperature", "0.7"]
    r = run(args)
    assert r.exit_code == 0, r.output
    doc = json.loads(r.output.strip().splitlines()[-1])
    assert doc["temperature"] == 0.7
    spec = next(s for s in doc["summary"] if s["category"] == "all" and s["mode"] == "speculative")
    assert spec["exact"] is None and spec["acceptance_rate"] is not None and spec["tokens_per_second"] > 0
    assert "sampled" in r.output
    again = json.loads(run(args).output.strip().splitlines()[-1])  # seeded: the same tokens again
    assert [x["generated_tokens"] for x in again["runs"]] == [x["generated_tokens"] for x in doc["runs"]]
    bad = run(args[:-1] + ["-1"])
    assert bad.exit_code != 0 and "temperature=-1.0" in bad.output + str(bad.exception)
    assert "warm-up" not in bad.output  # refused before the bundle loads


def test_serve_refuses_bad_serving_options_before_listening(tiny_bundle, capsys):
    assert main(["serve", str(tiny_bundle), "--prompt-cache-bytes", "lots"]) == 1
    assert "prompt cache size 'lots'; allowed: a byte count" in capsys.readouterr().err
    assert main(["serve", str(tiny_bundle), "--replicas", "2"]) == 2
    assert "--replicas and --cpus-per-replica need --ray" in capsys.readouterr().err
    assert main(["serve", str(tiny_bundle), "--max-batch", "0"]) == 2


def test_add_batch_graph(tiny_bundle, tmp_path, capsys):
    import shutil

    from edgellm.bundle import read_manifest
    from edgellm.errors import ConfigError
    from edgellm.export import add_batch_graph

    copy = tmp_path / "b"
    shutil.copytree(tiny_bundle, copy)
    r = run(["add-batch-graph", str(copy), "--slots", "3"])
    assert r.exit_code == 0, r.output
    assert read_manifest(copy).target.batch_slots == 3
    assert main(["add-batch-graph", str(copy), "--slots", "1"]) == 2  # a usage error
    assert "--slots" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="slots=1; allowed: an integer 2-64"):
        add_batch_graph(copy, slots=1)
    assert read_manifest(copy).target.batch_slots == 3  # nothing changed
