"""The decoding loop against pure-numpy fake models (tests/conftest.py::FakeLM)."""

from __future__ import annotations

import numpy as np
import pytest

from helpers import FakeLM, greedy_reference
from edgellm.errors import ConfigError, ContextLengthError
from edgellm.sampling import SamplingConfig
from edgellm.controller import DraftLengthController
from edgellm.speculative import DecodeConfig, DecodeStats, decode

PROMPT = [5, 17, 3, 9, 22, 5, 17]


def run(target, draft=None, **kw):
    stats = DecodeStats()
    cfg = DecodeConfig(**{"max_new_tokens": 40, "vocab_size": target.vocab, **kw})
    rounds = list(decode(target, PROMPT, cfg, draft=draft, stats=stats))
    tokens = [t for r in rounds for t in r.tokens]
    return tokens, rounds, stats


class Disagreeing(FakeLM):
    """A draft that proposes the target's choice except at chosen output positions."""

    def __init__(self, target: FakeLM, wrong_at=None, always_wrong=False):
        super().__init__(vocab=target.vocab)
        self.target, self.wrong_at, self.always_wrong = target, set(wrong_at or ()), always_wrong

    def logits_after(self, prefix):
        good = self.target.logits_after(prefix)
        out = len(prefix) - len(PROMPT)
        if self.always_wrong or out in self.wrong_at:
            bad = good.copy()
            bad[np.argmax(good)] = -1e9
            return bad
        return good


@pytest.mark.parametrize("mode", ["target", "speculative", "lookup"])
def test_greedy_output_equals_target_greedy(mode):
    target = FakeLM(seed=1)
    draft = FakeLM(seed=2)  # an unrelated model: mostly wrong proposals
    tokens, _, _ = run(target, draft, mode=mode)
    assert tokens == greedy_reference(target, PROMPT, 40)


@pytest.mark.parametrize("gamma", [1, 3, 5])
def test_draft_equal_to_target_accepts_everything(gamma):
    target = FakeLM(seed=1)
    draft = FakeLM(seed=1)
    tokens, rounds, stats = run(target, draft, num_draft_tokens=gamma, max_new_tokens=1 + 4 * (gamma + 1))
    assert tokens == greedy_reference(target, PROMPT, len(tokens))
    assert stats.acceptance_rate == 1.0
    # after the prefill token, every round is gamma accepted drafts plus the bonus token
    assert [len(r.tokens) for r in rounds] == [1] + [gamma + 1] * 4
    assert all(r.drafted == [True] * gamma + [False] for r in rounds[1:])


def test_draft_that_never_agrees_still_gives_target_output():
    target = FakeLM(seed=1)
    draft = Disagreeing(target, always_wrong=True)
    tokens, rounds, stats = run(target, draft, num_draft_tokens=3)
    assert tokens == greedy_reference(target, PROMPT, 40)
    assert stats.accepted_tokens == 0
    assert all(len(r.tokens) == 1 for r in rounds)


def test_draft_disagreeing_at_known_positions():
    target = FakeLM(seed=1)
    draft = Disagreeing(target, wrong_at={3, 10})
    tokens, rounds, stats = run(target, draft, num_draft_tokens=4, max_new_tokens=21)
    assert tokens == greedy_reference(target, PROMPT, 21)
    # output position 0 is the prefill token; rounds then cover 1-5 (wrong at 3 -> 2 accepted + fix)
    # then 4-8 all accepted, 9-10 (wrong at 10), 11-15, 16-20
    assert [len(r.tokens) for r in rounds] == [1, 3, 5, 2, 5, 5]
    assert rounds[1].drafted == [True, True, False]
    assert stats.accepted_tokens == 2 + 4 + 1 + 4 + 4


def test_caches_hold_exactly_the_committed_prefix_between_rounds():
    target = FakeLM(seed=1)
    draft = Disagreeing(target, wrong_at={2, 7, 8})
    cfg = DecodeConfig(max_new_tokens=30, vocab_size=target.vocab, num_draft_tokens=3)
    seq = list(PROMPT)
    for i, r in enumerate(decode(target, PROMPT, cfg, draft=draft)):
        seq += r.tokens
        if r.finish_reason:
            break
        # the last committed token is not in the target's cache yet: it starts the next verify
        assert target.cache == seq[:-1]
        assert draft.cache == seq[: draft.length]
        if i > 0:  # the draft is first filled in the first speculative round
            assert draft.length >= len(seq) - 2  # lags at most one after a fully accepted round


def test_eos_stops_and_is_not_emitted():
    target = FakeLM(seed=1)
    ref = greedy_reference(target, PROMPT, 40)
    eos = ref[6]
    first = ref.index(eos)
    tokens, rounds, _ = run(target, FakeLM(seed=1), eos_token_ids=(eos,), num_draft_tokens=4)
    assert tokens == ref[:first]
    assert rounds[-1].finish_reason == "stop"


def test_max_new_tokens_is_exact():
    target = FakeLM(seed=1)
    for mode in ("target", "speculative", "lookup"):
        tokens, rounds, _ = run(target, FakeLM(seed=1), mode=mode, max_new_tokens=13, num_draft_tokens=5)
        assert len(tokens) == 13 and rounds[-1].finish_reason == "length"


def test_vocab_padding_columns_are_ignored():
    target = FakeLM(seed=1, width=64)
    target.table[..., 50:] = 1e6  # padding logits that would win an argmax
    tokens, _, _ = run(target, FakeLM(seed=1, width=64), num_draft_tokens=3)
    assert max(tokens) < 50


def test_sampled_speculative_is_reproducible_and_in_vocab():
    target = FakeLM(seed=1, temperature=1.0)
    kw = dict(sampling=SamplingConfig(temperature=0.8, top_k=20), seed=123, num_draft_tokens=3)
    a, _, _ = run(target, FakeLM(seed=2, temperature=1.0), **kw)
    b, _, _ = run(target, FakeLM(seed=2, temperature=1.0), **kw)
    assert a == b and len(a) == 40


@pytest.mark.parametrize("mode", ["speculative", "lookup"])
def test_seeded_sampling_with_adaptive_gamma_does_not_follow_the_clock(monkeypatch, mode):
    """The draws follow the proposals, so a seeded request must choose its draft lengths from its
    tokens alone: under a clock that jitters run to run, the same seed gives the same text."""
    import edgellm.speculative as spec

    target = FakeLM(seed=1, temperature=1.0)
    kw = dict(mode=mode, sampling=SamplingConfig(temperature=1.0), seed=5)
    outs, gammas = [], []
    for clock_seed in range(4):
        jitter = np.random.default_rng(clock_seed)
        monkeypatch.setattr(spec.time, "perf_counter", lambda: float(jitter.uniform(0, 1e3)))
        tokens, _, stats = run(target, FakeLM(seed=2, temperature=1.0), **kw)
        outs.append(tokens)
        gammas.append(stats.gammas)
    assert all(o == outs[0] for o in outs) and all(g == gammas[0] for g in gammas)
    assert mode == "lookup" or len(set(gammas[0])) > 1  # the controller did adapt


def test_sampled_speculative_matches_target_distribution():
    """First two generated tokens: speculative vs target-only sampling, many seeds."""
    v = 5
    target, draft = FakeLM(vocab=v, seed=4, temperature=1.0), FakeLM(vocab=v, seed=5, temperature=1.0)
    samp = SamplingConfig(temperature=1.0)

    def histogram(mode, n):
        counts = np.zeros((v, v))
        for s in range(n):
            cfg = DecodeConfig(mode=mode, max_new_tokens=2, sampling=samp, seed=s, num_draft_tokens=2,
                               vocab_size=v)
            toks = [t for r in decode(target, [1, 2], cfg, draft=draft) for t in r.tokens]
            counts[toks[0], toks[1]] += 1
        return counts / n

    # exact joint distribution of two target-only samples
    probs = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # noqa: E731
    p1 = probs(target.logits_after([1, 2]))
    joint = np.array([p1[a] * probs(target.logits_after([1, 2, a])) for a in range(v)])
    spec = histogram("speculative", 6000)
    assert 0.5 * np.abs(spec - joint).sum() < 0.04


def test_adaptive_controller_backs_off_when_drafts_fail_and_grows_when_they_pass():
    ctl = DraftLengthController(max_gamma=8)
    for _ in range(30):
        ctl.observe(gamma=3, accepted=0, draft_step_s=0.01, verify_s=0.1)
        ctl.observe(gamma=0, accepted=0, draft_step_s=None, verify_s=0.06)
    assert ctl.choose_gamma(10) == 0
    ctl = DraftLengthController(max_gamma=8)
    for _ in range(30):
        ctl.observe(gamma=4, accepted=4, draft_step_s=0.001, verify_s=0.07)
        ctl.observe(gamma=0, accepted=0, draft_step_s=None, verify_s=0.06)
    assert ctl.choose_gamma(10) >= 4
    # free lookup proposals that are always accepted beat a paid, less accurate draft
    ctl = DraftLengthController(max_gamma=8)
    for _ in range(10):
        ctl.observe(gamma=4, accepted=3, draft_step_s=0.02, verify_s=0.07)
        ctl.observe(gamma=6, accepted=6, draft_step_s=None, verify_s=0.09, source="lookup")
    assert ctl.rate(6, "lookup") > ctl.rate(ctl.choose_gamma(10), "draft")


def test_controller_sees_acceptance_that_comes_in_runs():
    """Half the rounds accept all 8 proposals, half reject the first: E(1) = 1.5 and E(8) = 5.
    One pooled per-token rate (8/9 here) would say 1.89 and 5.65: runs are not independent."""
    ctl = DraftLengthController(max_gamma=8)
    for _ in range(40):
        ctl.observe(gamma=8, accepted=8, draft_step_s=0.01, verify_s=0.09)
        ctl.observe(gamma=8, accepted=0, draft_step_s=0.01, verify_s=0.09)
    ctl.observe(gamma=0, accepted=0, draft_step_s=None, verify_s=0.05)  # a plain step costs 50 ms
    assert abs(ctl.expected_tokens(8) - 5.0) < 0.3
    assert abs(ctl.expected_tokens(1) - 1.5) < 0.1
    assert ctl.choose_gamma(8) >= 6


def test_lookup_may_propose_longer_spans_than_the_draft():
    """Lookup proposals are free: a copied span accepted whole earns a longer gamma than the draft's cap."""
    ctl = DraftLengthController(max_gamma=4, max_lookup=12)
    for _ in range(20):
        ctl.observe(gamma=12, accepted=12, draft_step_s=None, verify_s=0.05 + 0.004 * 13, source="lookup")
        ctl.observe(gamma=0, accepted=0, draft_step_s=None, verify_s=0.05)
    assert 4 < ctl.choose_gamma(40, "lookup") <= 12
    assert ctl.choose_gamma(40, "draft") <= 4


def test_adaptive_mode_is_exact():
    target = FakeLM(seed=1)
    tokens, _, stats = run(target, Disagreeing(target, wrong_at={4, 5, 6, 20}), max_new_tokens=60)
    assert tokens == greedy_reference(target, PROMPT, 60)
    assert stats.rounds > 0


def test_lookup_proposes_from_the_prompt():
    target = FakeLM(seed=1)
    ref = greedy_reference(target, PROMPT, 30)
    prompt = PROMPT + ref[:20] + PROMPT  # the answer is already in the prompt
    stats = DecodeStats()
    cfg = DecodeConfig(mode="lookup", max_new_tokens=20, vocab_size=target.vocab, num_draft_tokens=6)
    tokens = [t for r in decode(target, prompt, cfg, stats=stats) for t in r.tokens]
    assert tokens == greedy_reference(target, prompt, 20)
    assert stats.accepted_tokens > 0


def test_errors():
    target = FakeLM(seed=1, max_context=16)
    with pytest.raises(ConfigError, match="empty"):
        list(decode(target, [], DecodeConfig()))
    with pytest.raises(ConfigError, match="draft"):
        list(decode(target, [1, 2], DecodeConfig(mode="speculative")))
    with pytest.raises(ContextLengthError, match="max_context"):
        list(decode(target, list(range(16)), DecodeConfig(mode="target")))
    with pytest.raises(ConfigError, match="mode"):
        DecodeConfig(mode="fast")
    with pytest.raises(ConfigError, match="max_new_tokens"):
        DecodeConfig(max_new_tokens=0)


def test_target_mode_fills_its_second_row_with_a_free_lookup_token():
    """A lone pass is two rows anyway: the second carries a lookup proposal, so repeats cost fewer passes."""
    target = FakeLM(vocab=8, seed=3, temperature=0.5)  # few tokens: its greedy output soon repeats itself
    prompt = [1, 2, 3, 1, 2, 3]
    stats = DecodeStats()
    cfg = DecodeConfig(mode="target", max_new_tokens=40, vocab_size=8)
    tokens = [t for r in decode(target, prompt, cfg, stats=stats) for t in r.tokens]
    assert tokens == greedy_reference(target, prompt, 40)
    assert stats.accepted_tokens > 0 and stats.rounds < 39
    assert all(n <= 2 for _, n in target.calls[1:])  # the prompt, then passes of one or two new tokens
    # sampled: still the target's law (a one-hot proposal through rejection sampling), reproducible by seed
    kw = dict(mode="target", max_new_tokens=12, vocab_size=8, sampling=SamplingConfig(temperature=1.0), seed=7)
    a = [t for r in decode(target, prompt, DecodeConfig(**kw)) for t in r.tokens]
    assert a == [t for r in decode(target, prompt, DecodeConfig(**kw)) for t in r.tokens] and len(a) == 12


def test_sampled_target_mode_with_free_proposals_keeps_the_target_distribution():
    v, prompt = 5, [1, 2, 1, 2]  # the suffix [1, 2] occurred before: the first pass carries the proposal 1
    target = FakeLM(vocab=v, seed=4, temperature=1.0)
    counts = np.zeros((v, v))
    n = 6000
    for s in range(n):
        cfg = DecodeConfig(mode="target", max_new_tokens=2, sampling=SamplingConfig(temperature=1.0), seed=s,
                           vocab_size=v)
        toks = [t for r in decode(target, prompt, cfg) for t in r.tokens]
        counts[toks[0], toks[1]] += 1
    probs = lambda x: np.exp(x - x.max()) / np.exp(x - x.max()).sum()  # noqa: E731
    p1 = probs(target.logits_after(prompt))
    joint = np.array([p1[a] * probs(target.logits_after(prompt + [a])) for a in range(v)])
    assert 0.5 * np.abs(counts / n - joint).sum() < 0.04
