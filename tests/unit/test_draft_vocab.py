"""The draft's reduced vocabulary (FR-Spec): which tokens are kept, and why exactness is untouched."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import FakeLM, greedy_reference
from edgellm.errors import BundleError, ConfigError
from edgellm.export.draft_vocab import DraftVocabConfig, frequent_tokens, write_ids
from edgellm.runtimes.graphs import expand_logits, read_token_ids
from edgellm.sampling import SamplingConfig
from edgellm.speculative import DecodeConfig, DecodeStats, decode


def test_frequent_tokens_by_count_then_id_plus_special_tokens():
    counts = np.array([0, 5, 9, 5, 0, 1, 0, 7])
    # 9 (id 2), 7 (id 7), then the tie 5/5 by id (1 before 3)
    assert frequent_tokens(counts, 3).tolist() == [1, 2, 7]
    assert frequent_tokens(counts, 4).tolist() == [1, 2, 3, 7]
    assert frequent_tokens(counts, 6).tolist() == [0, 1, 2, 3, 5, 7]  # uncounted ones by id: 0 first
    assert frequent_tokens(counts, 2, always=[6, 99]).tolist() == [2, 6, 7]  # special on top, out of range ignored


def test_ids_round_trip_and_damaged_files_are_refused(tmp_path):
    write_ids(tmp_path / "v", np.array([0, 3, 9]))
    assert read_token_ids(tmp_path / "v", 10).tolist() == [0, 3, 9]
    for bad in ([3, 0], [0, 0], [0, 10], []):
        write_ids(tmp_path / "b", np.array(bad, np.int64))
        with pytest.raises(BundleError, match="ascending unique int32 token ids"):
            read_token_ids(tmp_path / "b", 10)
    (tmp_path / "odd").write_bytes(b"\x00" * 6)
    with pytest.raises(BundleError):
        read_token_ids(tmp_path / "odd", 10)


def test_expand_logits_puts_minus_infinity_outside_the_subset():
    full = expand_logits(np.array([[1.0, 2.0], [3.0, -1.0]], np.float32), np.array([1, 4]), 6)
    assert full.shape == (2, 6) and full[0, 1] == 1 and full[0, 4] == 2 and full[1, 1] == 3
    assert np.isneginf(full[:, [0, 2, 3, 5]]).all()


def test_config_validates_itself(tmp_path):
    for bad in (-1, 1.5, True, "32k"):
        with pytest.raises(ConfigError, match="draft_vocab="):
            DraftVocabConfig(bad)
    with pytest.raises(ConfigError, match="draft_vocab_corpus="):
        DraftVocabConfig(64, str(tmp_path / "missing.txt"))
    (tmp_path / "latin1.txt").write_bytes(b"caf\xe9")
    with pytest.raises(ConfigError, match="not UTF-8"):
        DraftVocabConfig(64, str(tmp_path / "latin1.txt")).texts()


class Truncated(FakeLM):
    """A draft whose LM head keeps only ``keep`` tokens, as the runtime presents it (``-inf`` elsewhere)."""

    def __init__(self, keep, **kw):
        super().__init__(**kw)
        self.keep = np.asarray(keep)

    def forward(self, token_ids, num_logits=1):
        return expand_logits(super().forward(token_ids, num_logits)[:, self.keep], self.keep, self.vocab)


def test_truncated_draft_keeps_greedy_output_exact():
    target = FakeLM(seed=1)
    draft = Truncated(np.arange(0, 50, 3), seed=1)  # the target's own weights, a third of its vocabulary
    stats = DecodeStats()
    cfg = DecodeConfig(mode="speculative", max_new_tokens=40, vocab_size=50, num_draft_tokens=3)
    tokens = [t for r in decode(target, [5, 17, 3], cfg, draft=draft, stats=stats) for t in r.tokens]
    assert tokens == greedy_reference(target, [5, 17, 3], 40)
    assert 0 < stats.acceptance_rate < 1  # it agrees where the target's token is kept, never elsewhere


def test_truncated_draft_keeps_the_target_distribution():
    """First two sampled tokens with a draft that cannot propose two of five tokens: still the target's law."""
    v = 5
    target, draft = FakeLM(vocab=v, seed=4, temperature=1.0), Truncated([0, 2, 3], vocab=v, seed=4, temperature=1.0)
    counts = np.zeros((v, v))
    n = 6000
    for s in range(n):
        cfg = DecodeConfig(mode="speculative", max_new_tokens=2, sampling=SamplingConfig(temperature=1.0), seed=s,
                           num_draft_tokens=2, vocab_size=v)
        toks = [t for r in decode(target, [1, 2], cfg, draft=draft) for t in r.tokens]
        counts[toks[0], toks[1]] += 1
    probs = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # noqa: E731
    p1 = probs(target.logits_after([1, 2]))
    joint = np.array([p1[a] * probs(target.logits_after([1, 2, a])) for a in range(v)])
    assert 0.5 * np.abs(counts / n - joint).sum() < 0.04
    assert counts[[1, 4]].sum() > 0.05 * n  # the tokens the draft cannot propose still come out
