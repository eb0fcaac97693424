"""Runtime on a tiny exported bundle: exactness of every mode, KV rollback, streaming, errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

import edgellm
from edgellm.errors import BundleError, ConfigError, ContextLengthError, ManifestError, ProviderUnavailableError, RollbackError


PROMPT = "def foo(x): return"


@pytest.fixture(scope="module")
def llm(tiny_bundle):
    return edgellm.load(tiny_bundle, threads=1)


def test_greedy_modes_equal_target(llm):
    ref = llm.generate(PROMPT, mode="target", max_new_tokens=40)
    assert len(ref.token_ids) > 0
    for mode in ("speculative", "lookup"):
        for k in (None, 1, 4):
            out = llm.generate(PROMPT, mode=mode, max_new_tokens=40, num_draft_tokens=k)
            assert out.token_ids == ref.token_ids, (mode, k)
            assert out.text == ref.text


def test_draft_equal_to_target_accepts_everything(llm):
    import dataclasses

    from edgellm.speculative import DecodeStats

    cfg = dataclasses.replace(llm.decode_config(mode="speculative", max_new_tokens=31, num_draft_tokens=5),
                              eos_token_ids=())  # no early stop: the pattern below is exact
    stats = DecodeStats()
    rounds = list(llm.generate_tokens(llm.prompt_ids(PROMPT), cfg, stats))
    assert [len(r.tokens) for r in rounds] == [1] + [6] * 5  # prefill token, then 5 drafts + bonus
    assert stats.acceptance_rate == 1.0


def test_rollback_keeps_cache_equal_to_committed_prefix(llm):
    sess = llm.target.session
    ids = np.array(llm.tokenizer.encode("hello world, héllo wörld def foo(x)"), np.int64)
    sess.reset()
    sess.forward(ids[:6], 1)
    sess.forward(ids[6:], 1)
    full = [sess.cache_array(0, "key"), sess.cache_array(1, "value")]
    sess.rollback(6)
    assert sess.length == 6
    sess.rollback(6)  # idempotent
    sess.forward(np.array([7, 8, 9]), 1)  # overwrite the tail with other tokens
    sess.rollback(6)
    sess.forward(ids[6:], 1)
    np.testing.assert_allclose(sess.cache_array(0, "key"), full[0], atol=1e-6)
    np.testing.assert_allclose(sess.cache_array(1, "value"), full[1], atol=1e-6)
    with pytest.raises(RollbackError, match="holds"):
        sess.rollback(sess.length + 1)


@pytest.mark.parametrize("min_rows, exact", [(2, True), (1, None)])
def test_target_rows_do_not_depend_on_batching(tiny_bundle, min_rows, exact):
    """With min_rows=2 (the target's setting) a position's logits are bit-identical whether it
    is decoded alone or verified with others; min_rows=1 may differ in the last bits."""
    from edgellm.api import _layout
    from edgellm.bundle import read_manifest
    from edgellm.runtimes.providers import resolve_provider
    from edgellm.runtimes.session import DecoderSession

    m = read_manifest(tiny_bundle)
    sess = DecoderSession(tiny_bundle / m.target.graph, _layout(m.target), resolve_provider("cpu"), 2, min_rows)
    ids = np.arange(3, 60, dtype=np.int64)
    sess.forward(ids[:40], 1)
    batch = sess.forward(ids[40:47], 7).copy()
    assert sess.length == 47
    sess.rollback(40)
    singles = np.stack([sess.forward(ids[i:i + 1], 1)[0].copy() for i in range(40, 47)])
    assert sess.length == 47
    if exact:
        np.testing.assert_array_equal(singles, batch)
    else:
        np.testing.assert_allclose(singles, batch, atol=1e-4)


def test_sessions_spin_only_while_a_pass_runs(tiny_bundle):
    """The thread policy: a session's workers spin during a pass (no wake-up per kernel) and stop
    when it returns (the other session of the pair then has the cores); benchmarks/thread_pools.py
    measures it."""
    from edgellm.bundle import read_manifest
    from edgellm.runtimes.graphs import open_session
    from edgellm.runtimes.providers import resolve_provider

    session, _ = open_session(tiny_bundle / read_manifest(tiny_bundle).target.graph, resolve_provider("cpu"), 2)
    so = session.get_session_options()
    assert (so.intra_op_num_threads, so.inter_op_num_threads) == (2, 1)
    assert so.get_session_config_entry("session.intra_op.allow_spinning") == "1"
    assert so.get_session_config_entry("session.force_spinning_stop") == "1"


def test_sampled_generation_is_seeded(llm):
    a = llm.generate(PROMPT, temperature=0.9, top_p=0.95, seed=5, max_new_tokens=20)
    b = llm.generate(PROMPT, temperature=0.9, top_p=0.95, seed=5, max_new_tokens=20)
    assert a.token_ids == b.token_ids


def test_stream_pieces_join_to_text_and_never_split_characters(llm):
    pieces = list(llm.stream("hello wörld 😀", mode="target", max_new_tokens=30))
    full = llm.generate("hello wörld 😀", mode="target", max_new_tokens=30)
    assert "".join(pieces) == full.text
    assert all("\ufffd" not in p for p in pieces)


def test_stop_strings(llm):
    full = llm.generate(PROMPT, mode="target", max_new_tokens=40).text
    if len(full) > 6:
        stop = full[3:6]
        out = llm.generate(PROMPT, mode="speculative", max_new_tokens=40, stop=[stop])
        assert out.text == full[: full.find(stop)] and out.finish_reason == "stop"


def test_chat_messages_use_the_template(llm):
    msgs = [{"role": "user", "content": "hello"}]
    ids = llm.prompt_ids(msgs)
    assert llm.tokenizer.decode(ids).startswith("user") or ids[0] == llm.tokenizer.tok.token_to_id("<|im_start|>")
    assert llm.generate(msgs, max_new_tokens=5).finish_reason in ("stop", "length")
    with pytest.raises(ConfigError, match="role"):
        llm.generate([{"role": "wizard", "content": "x"}])


def test_bad_generation_values(llm):
    with pytest.raises(ConfigError, match="empty"):
        llm.generate("")
    with pytest.raises(ConfigError, match="temperature"):
        llm.generate(PROMPT, temperature=-1)
    with pytest.raises(ConfigError, match="mode"):
        llm.generate(PROMPT, mode="turbo")
    with pytest.raises(ContextLengthError, match="max_context"):
        llm.generate("hello " * 400)


def test_options_object_and_keyword_overrides_are_one_thing(llm):
    opts = edgellm.GenerationOptions(mode="speculative", max_new_tokens=12, temperature=0.8, seed=3, stop=("zz",))
    a = llm.generate(PROMPT, opts)
    b = llm.generate(PROMPT, mode="speculative", max_new_tokens=12, temperature=0.8, seed=3, stop="zz")
    c = llm.generate(PROMPT, edgellm.GenerationOptions(max_new_tokens=12), mode="speculative", temperature=0.8,
                     seed=3, stop=["zz"])
    assert a.token_ids == b.token_ids == c.token_ids and len(a.token_ids) >= 1
    assert "".join(llm.stream(PROMPT, opts)) == a.text
    with pytest.raises(ConfigError, match="unknown generation option 'max_tokens'; allowed: mode, max_new_tokens"):
        llm.generate(PROMPT, max_tokens=5)
    with pytest.raises(ConfigError, match="adapter='x' is not in this bundle"):
        llm.generate(PROMPT, opts, adapter="x")


def test_bundle_errors(tiny_bundle, tmp_path):
    with pytest.raises(BundleError, match="does not exist"):
        edgellm.load(tmp_path / "nope")
    copy = tmp_path / "copy"
    shutil.copytree(tiny_bundle, copy)
    with open(copy / "draft" / "model.onnx.data", "r+b") as f:  # flip one byte
        b = f.read(1)
        f.seek(0)
        f.write(bytes([b[0] ^ 0xFF]))
    with pytest.raises(BundleError, match="draft/model.onnx.data"):
        edgellm.load(copy)
    m = json.loads((copy / "manifest.json").read_text())
    m["format_version"] = 99
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="format_version 99"):
        edgellm.load(copy)
    m["format_version"] = 1
    m["models"]["target"]["graph"] = "../../etc/passwd"
    (copy / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(ManifestError, match="leaves the bundle"):
        edgellm.load(copy)


def test_unavailable_provider(tiny_bundle):
    with pytest.raises(ProviderUnavailableError, match="available: cpu"):
        edgellm.load(tiny_bundle, provider="coreml")
    with pytest.raises(ProviderUnavailableError, match="known"):
        edgellm.load(tiny_bundle, provider="tpu")
    with pytest.warns(RuntimeWarning, match="falling back"):
        llm = edgellm.load(tiny_bundle, provider="qnn", fallback=True, threads=1)
    assert llm.providers["target"] == "cpu"


def test_target_only_bundle_supports_lookup(tiny_model_dir, tmp_path):
    from edgellm.export import export

    b = export(tiny_model_dir, output=tmp_path / "solo", quality="none", max_context=128)
    llm = edgellm.load(b, threads=1)
    ref = llm.generate(PROMPT, max_new_tokens=20)
    assert ref.stats["mode"] == "target"
    assert llm.generate(PROMPT, mode="lookup", max_new_tokens=20).token_ids == ref.token_ids
    with pytest.raises(ConfigError, match="draft"):
        llm.generate(PROMPT, mode="speculative")
