"""Hostile but realistic input to the CLI, the API and the exporter: one clean error, nothing lost.

Tiny bundles only. Each test names the case of the "hardening" issue it covers.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import edgellm
from edgellm.cli import main
from edgellm.errors import BundleError, ConfigError, ContextLengthError, ManifestError
from edgellm.bundle import sha256_file
from edgellm.manifest import manifest_digest


PROMPT = "def foo(x): return"


def rewrite(bundle: Path, mutate, *, rehash: bool = True) -> None:
    """Edit ``bundle``'s manifest with ``mutate(doc)``; ``rehash``: recompute its manifest_sha256."""
    path = bundle / "manifest.json"
    doc = json.loads(path.read_text())
    mutate(doc)
    if rehash:
        doc["manifest_sha256"] = manifest_digest(doc)
    path.write_text(json.dumps(doc))


def relist(doc: dict, bundle: Path, rel: str) -> None:
    """List (or re-list) ``rel`` in ``files`` with its current hash and size."""
    p = bundle / rel
    doc["files"][rel] = {"sha256": sha256_file(p), "size": p.stat().st_size}


@pytest.fixture()
def copy(tiny_bundle, tmp_path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(tiny_bundle, out)
    return out


def clean_error(capsys, code: int, *needles: str) -> str:
    err = capsys.readouterr().err
    assert code == 1, err
    assert err.startswith("Error:") and "Traceback" not in err, err
    for n in needles:
        assert n in err, err
    return err


# ------------------------------------------------------------------ 1. nothing lost at the context limit
@pytest.mark.parametrize("mode", ["target", "speculative", "lookup"])
def test_generation_stops_at_the_context_limit_and_keeps_its_tokens(tiny_bundle, mode, capsys):
    code = main(["generate", str(tiny_bundle), PROMPT, "--json", "--mode", mode, "--max-new-tokens", "1000000",
                 "--threads", "1"])
    out, err = capsys.readouterr()
    assert code == 0, err
    doc = json.loads(out.strip().splitlines()[-1])
    llm = edgellm.load(tiny_bundle, threads=1)
    prompt_tokens = len(llm.prompt_ids(PROMPT))
    if doc["finish_reason"] == "length":  # no eos before the context filled up
        assert prompt_tokens + len(doc["token_ids"]) == llm.manifest.target.max_context
        assert doc["stats"]["context_full"] is True
    r = llm.generate(PROMPT, mode=mode, max_new_tokens=10**9)
    assert r.token_ids == doc["token_ids"] and r.finish_reason == doc["finish_reason"]
    assert r.token_ids == llm.generate(PROMPT, mode="target", max_new_tokens=10**9).token_ids  # still exact


def test_prompt_without_room_is_refused_before_any_work(tiny_bundle, capsys):
    llm = edgellm.load(tiny_bundle, threads=1)
    long = "hello " * 400
    with pytest.raises(ContextLengthError, match="max_context is 256"):
        next(llm.stream_events(long))
    clean_error(capsys, main(["generate", str(tiny_bundle), long, "--json"]), "max_context")


# ------------------------------------------------------------------ 4 and 6. bad values: one clean error
@pytest.mark.parametrize("args, needle", [
    (["--seed", "-1"], "seed=-1"),
    (["--seed", str(2**64)], "seed="),
    (["--top-p", "0"], "top_p=0"),
    (["--top-p", "1.5"], "top_p=1.5"),
    (["--temperature", "-1"], "temperature=-1"),
    (["--temperature", "nan"], "temperature=nan"),
    (["--top-k", "-2"], "top_k=-2"),
    (["--max-new-tokens", "0"], "max_new_tokens=0"),
    (["--num-draft-tokens", "100"], "num_draft_tokens=100"),
    (["--stop", ""], "stop="),
])
def test_bad_generation_options_are_clean_errors(tiny_bundle, capsys, args, needle):
    clean_error(capsys, main(["generate", str(tiny_bundle), PROMPT, "--threads", "1", *args]), needle)


def test_tiny_temperature_is_greedy_not_padding(tiny_bundle):
    llm = edgellm.load(tiny_bundle, threads=1)
    greedy = llm.generate(PROMPT, max_new_tokens=16)
    tiny = llm.generate(PROMPT, max_new_tokens=16, temperature=1e-310, seed=1)
    assert tiny.token_ids == greedy.token_ids


def test_invalid_utf8_in_argv_is_a_clean_error(tiny_bundle):
    r = subprocess.run([sys.executable, "-m", "edgellm.cli", "generate", str(tiny_bundle).encode(), b"abc\xff\xfe",
                        b"--max-new-tokens", b"2"], capture_output=True, timeout=120)
    err = r.stderr.decode(errors="replace")
    assert r.returncode == 1 and err.startswith("Error:") and "not valid Unicode" in err and "Traceback" not in err


def test_lone_surrogate_in_the_api_is_a_config_error(tiny_bundle):
    llm = edgellm.load(tiny_bundle, threads=1)
    with pytest.raises(ConfigError, match="not valid Unicode"):
        llm.generate("x\ud800y", max_new_tokens=2)
    with pytest.raises(ConfigError, match="not valid Unicode"):
        llm.generate([{"role": "user", "content": "\udcff"}], max_new_tokens=2)
    with pytest.raises(ConfigError, match="not valid Unicode"):
        llm.generate("x", max_new_tokens=2, stop=["\ud800"])


# ------------------------------------------------------------------ 4. export outputs that crashed
def test_export_output_errors_are_clean(tmp_path, capsys, tiny_model_dir):
    f = tmp_path / "file.txt"
    f.write_text("not a bundle")
    clean_error(capsys, main(["export", str(tiny_model_dir), "-o", str(f), "--overwrite"]), "is a file")
    assert f.read_text() == "not a bundle"
    clean_error(capsys, main(["export", str(tiny_model_dir), "-o", str(f / "sub")]), "cannot create")
    clean_error(capsys, main(["export", str(tiny_model_dir), "-o", str(tmp_path / "b"), "--max-context",
                              str(10**12)]), "max_context=1000000000000")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file.txt"]


def test_export_into_a_read_only_folder_is_clean(tmp_path, capsys, tiny_model_dir, monkeypatch):
    parent = tmp_path / "ro"
    parent.mkdir()
    parent.chmod(0o555)
    if os.access(parent, os.W_OK):  # root writes anyway: make the folder creation fail as it would
        import tempfile

        def refuse(*a, **k):
            raise PermissionError(13, "Permission denied", str(parent))

        monkeypatch.setattr(tempfile, "mkdtemp", refuse)
    try:
        clean_error(capsys, main(["export", str(tiny_model_dir), "-o", str(parent / "b")]), "Permission denied")
    finally:
        parent.chmod(0o755)


# ------------------------------------------------------------------ 5. SIGTERM / SIGINT during an export
@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_during_export_leaves_nothing(tmp_path, tiny_model_dir, sig):
    out = tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-m", "edgellm.cli", "export", str(tiny_model_dir), "-o", str(out),
                             "--quality", "none"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:  # wait until it is mid-export: the tokenizer is written, the graphs not yet
        while not list(tmp_path.glob(".b.partial-*/tokenizer")):
            assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read().decode()[-2000:]
            time.sleep(0.01)
        proc.send_signal(sig)
        proc.wait(60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode in (130, 143), proc.stderr.read().decode()[-2000:]
    assert list(tmp_path.iterdir()) == []  # no partial folder, no bundle


def test_export_removes_stale_partial_folders(tmp_path, tiny_model_dir):
    from edgellm.export import PARTIAL_OWNER, export

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = tmp_path / ".b.partial-dead"
    (stale / "target").mkdir(parents=True)
    (stale / PARTIAL_OWNER).write_text(dead.stdout.strip())
    ownerless = tmp_path / ".b.partial-old"
    ownerless.mkdir()
    running = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        busy = tmp_path / ".b.partial-busy"
        busy.mkdir()
        (busy / PARTIAL_OWNER).write_text(str(running.pid))
        other = tmp_path / ".c.partial-dead"  # another output's: not ours to remove
        other.mkdir()
        export(tiny_model_dir, output=tmp_path / "b", quality="none", max_context=64)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".b.partial-busy", ".c.partial-dead", "b"]
        assert not (tmp_path / "b" / PARTIAL_OWNER).exists()  # the marker is not shipped in the bundle
        assert PARTIAL_OWNER not in (tmp_path / "b" / "manifest.json").read_text()
    finally:
        running.kill()


def test_context_past_the_model_warns_once(tmp_path, tiny_model_dir, capsys):
    assert main(["export", str(tiny_model_dir), "-o", str(tmp_path / "b"), "--quality", "none",
                 "--max-context", "100000"]) == 0
    err = capsys.readouterr().err
    assert err.count("Warning:") == 1 and "max_context=100000" in err and "uses 512" in err


def test_low_acceptance_hint_names_a_weaker_quantization():
    from edgellm.export.report import judge as _judge

    say: list[str] = []
    bad = {"top1_agreement": 0.2, "mean_kl": 3.0, "positions": 10}
    for quant, expect in (({"quant": "int4", "block_size": 128}, "--draft-quant int8"),
                          ({"quant": "qdq-w4"}, "--npu-draft-quant qdq"), ({"quant": "fp32"}, "closer draft")):
        report = {"models": {"draft": {"quantization": quant, "quantized_vs_fp32": bad}}}
        with pytest.warns(RuntimeWarning) as rec:
            _judge(report, 0.1, say.append)
        assert len(rec) == 1 and expect in str(rec[0].message)
        assert f"--draft-quant {quant['quant']}" not in str(rec[0].message)
    assert not any("WARNING" in line or "reject" in line for line in say)  # shown once, as a warning


# ------------------------------------------------------------------ 7. paths and the manifest's own integrity
def test_edited_manifest_is_reported_and_refused(copy, capsys):
    assert main(["inspect", str(copy)]) == 0
    assert "matches its manifest_sha256" in capsys.readouterr().out
    rewrite(copy, lambda d: d["tokenizer"].update(vocab_size=10), rehash=False)
    clean_error(capsys, main(["inspect", str(copy)]), "manifest.json: edited after export")
    with pytest.raises(BundleError, match="edited after export"):
        edgellm.load(copy)
    rewrite(copy, lambda d: None)  # the same edit with a recomputed hash: the tokenizer disagrees
    with pytest.raises(BundleError, match=r"vocab_size=10 in the manifest, but .* holds \d+ tokens"):
        edgellm.load(copy)


@pytest.mark.parametrize("value, needle", [
    (7, "quality_report: expected a relative path"),
    (["quality.json"], "quality_report: expected a relative path"),
    ("../../outside.json", "leaves the bundle"),
    ("missing.json", "not listed in 'files'"),
])
def test_quality_report_entry_must_be_a_listed_path(copy, capsys, value, needle):
    rewrite(copy, lambda d: d.update(quality_report=value))
    clean_error(capsys, main(["inspect", str(copy)]), needle)


@pytest.mark.parametrize("content", [b"\x00\xff\xfe binary", b"[1, 2, 3]", b'{"models": 5}', b"[" * 100000])
def test_unreadable_quality_report_is_a_problem_not_a_traceback(copy, capsys, content):
    (copy / "quality.json").write_bytes(content)
    rewrite(copy, lambda d: relist(d, copy, "quality.json"))
    clean_error(capsys, main(["inspect", str(copy)]), "quality.json: the quality report is not")


def test_chat_template_cannot_point_outside(copy, tmp_path):
    outside = tmp_path / "secret.txt"
    outside.write_text("{{ 'leaked' }}")
    tpl = copy / "tokenizer" / "chat_template.jinja"
    tpl.unlink()
    tpl.symlink_to(outside)
    rewrite(copy, lambda d: relist(d, copy, "tokenizer/chat_template.jinja"))  # even with its hash listed
    with pytest.raises(BundleError, match="resolves outside the bundle"):
        edgellm.load(copy)
    rewrite(copy, lambda d: d["files"].pop("tokenizer/chat_template.jinja"))  # or not listed at all
    with pytest.raises(ManifestError, match="chat_template .* is not listed"):
        edgellm.load(copy)


def _leaves(doc, path=()):
    if isinstance(doc, dict):
        for k, v in doc.items():
            yield from _leaves(v, path + (k,))
    elif isinstance(doc, list) and doc:
        yield from _leaves(doc[0], path + (0,))
    if path:
        yield path


def _set(doc, path, value):
    for k in path[:-1]:
        doc = doc[k]
    doc[path[-1]] = value


def test_any_edited_manifest_field_is_a_clean_error(copy, capsys):
    """Every field of the manifest set to wrong types and values (hash recomputed, so the parser
    and loader themselves are tested): generate and inspect answer with output or one clean error."""
    original = json.loads((copy / "manifest.json").read_text())
    paths = [p for p in _leaves(original) if p[0] not in ("files", "manifest_sha256")]
    paths += [("files",), ("files", "quality.json"), ("files", "quality.json", "size")]
    assert len(paths) > 60
    for path in paths:
        for value in (None, "x", -1, 10**30, [], {}):
            doc = json.loads(json.dumps(original))
            _set(doc, path, value)
            doc["manifest_sha256"] = manifest_digest(doc)
            (copy / "manifest.json").write_text(json.dumps(doc))
            for args in (["generate", str(copy), "x", "--max-new-tokens", "2", "--threads", "1"],
                         ["inspect", str(copy), "--no-hashes"]):
                try:
                    code = main(args)
                except Exception as e:  # noqa: BLE001 - the failure this test exists to find
                    pytest.fail(f"{args[0]} with {'.'.join(map(str, path))} = {value!r}: {type(e).__name__}: {e}")
                err = capsys.readouterr().err
                assert code in (0, 1) and "Traceback" not in err, (path, value, err)
                assert code == 0 or err.startswith("Error:"), (path, value, err)


def test_chat_drops_the_oldest_turns_when_the_context_is_full(tiny_bundle):
    from click.testing import CliRunner

    from edgellm.cli import cli

    turns = "\n".join(["word " * 12] * 8) + "\n\n"  # each turn ~60 tokens with its answer: past 256
    r = CliRunner().invoke(cli, ["chat", str(tiny_bundle), "--system", "be brief", "--max-new-tokens", "8",
                                 "--threads", "1"], input=turns)
    assert r.exit_code == 0, r.output
    assert "dropped its" in r.output and r.output.count("assistant> ") == 8
