"""The accept/reject math, checked exactly (greedy) and statistically (sampling)."""

from __future__ import annotations

import numpy as np
import pytest

from edgellm.errors import ConfigError
from edgellm.sampling import (SamplingConfig, greedy_accept, probabilities, rejection_accept, residual, sample)


def test_greedy_accept_all_none_and_partial():
    assert greedy_accept(np.array([3, 4, 5]), np.array([3, 4, 5, 9])) == (3, 9)
    assert greedy_accept(np.array([3, 4, 5]), np.array([7, 4, 5, 9])) == (0, 7)
    assert greedy_accept(np.array([3, 4, 5]), np.array([3, 8, 5, 9])) == (1, 8)
    assert greedy_accept(np.array([], np.int64), np.array([6])) == (0, 6)


def test_residual_is_normalized_positive_part():
    p, q = np.array([0.5, 0.3, 0.2]), np.array([0.2, 0.6, 0.2])
    np.testing.assert_allclose(residual(p, q), [1.0, 0.0, 0.0])
    np.testing.assert_allclose(residual(p, p), p)  # degenerate: falls back to p


def _emitted_distribution(p_rows, q_rows, trials, seed):
    """Distribution of the first emitted token after one speculative round with gamma=1."""
    rng = np.random.default_rng(seed)
    v = p_rows.shape[1]
    counts = np.zeros(v)
    for _ in range(trials):
        x = sample(q_rows[0], rng)
        n, tok = rejection_accept(np.array([x]), q_rows, p_rows, rng)
        counts[x if n == 1 else tok] += 1
    return counts / trials


@pytest.mark.parametrize("case", ["random", "q_zero_somewhere", "p_equals_q", "one_hot_p", "one_hot_q"])
def test_rejection_sampling_follows_target(case):
    rng = np.random.default_rng(1)
    v = 6
    p = rng.dirichlet(np.ones(v))
    q = rng.dirichlet(np.ones(v))
    if case == "q_zero_somewhere":
        q[[1, 4]] = 0.0
        q /= q.sum()
    elif case == "p_equals_q":
        q = p.copy()
    elif case == "one_hot_p":
        p = np.eye(v)[2]
    elif case == "one_hot_q":
        q = np.eye(v)[3]
    p_rows = np.stack([p, rng.dirichlet(np.ones(v))])
    got = _emitted_distribution(p_rows, q[None], trials=20000, seed=7)
    tv = 0.5 * np.abs(got - p).sum()
    assert tv < 0.02, (case, got, p)


def test_rejection_all_accepted_samples_bonus_from_last_row():
    p = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    q = np.array([[0.0, 1.0, 0.0]])
    assert rejection_accept(np.array([1]), q, p, np.random.default_rng(0)) == (1, 2)


def test_two_token_sequences_follow_target():
    """gamma=2: the joint distribution of the first two emitted tokens equals p's chain."""
    rng = np.random.default_rng(3)
    v = 4
    p1 = rng.dirichlet(np.ones(v))
    p2 = rng.dirichlet(np.ones(v), size=v)  # next-token distribution given the first token
    q1 = rng.dirichlet(np.ones(v))
    q2 = rng.dirichlet(np.ones(v), size=v)
    counts = np.zeros((v, v))
    trials = 30000
    for _ in range(trials):
        d1 = sample(q1, rng)
        d2 = sample(q2[d1], rng)
        p_rows = np.stack([p1, p2[d1], np.ones(v) / v])
        n, tok = rejection_accept(np.array([d1, d2]), np.stack([q1, q2[d1]]), p_rows, rng)
        emitted = [d1, d2][:n] + [tok]
        if n == 0:
            emitted.append(sample(p2[emitted[0]], rng))  # continue with the target alone
        counts[emitted[0], emitted[1]] += 1
    joint = p1[:, None] * p2
    assert 0.5 * np.abs(counts / trials - joint).sum() < 0.03


def test_probabilities_temperature_top_k_top_p():
    logits = np.log(np.array([0.5, 0.25, 0.15, 0.1]))
    np.testing.assert_allclose(probabilities(logits, SamplingConfig(1.0)), [0.5, 0.25, 0.15, 0.1])
    np.testing.assert_allclose(probabilities(logits, SamplingConfig(1.0, top_k=2)), [2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(probabilities(logits, SamplingConfig(1.0, top_p=0.7)), [2 / 3, 1 / 3, 0, 0])
    np.testing.assert_allclose(probabilities(logits, SamplingConfig(1.0, top_p=0.3)), [1, 0, 0, 0])
    hot = probabilities(logits, SamplingConfig(0.01))
    assert hot[0] > 0.999


@pytest.mark.parametrize("kwargs", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_k=-2),
                                    dict(top_p=0.0), dict(top_p=1.5), dict(top_k=1.5)])
def test_bad_sampling_values_are_refused(kwargs):
    with pytest.raises(ConfigError) as e:
        SamplingConfig(**kwargs)
    assert "allowed" in str(e.value)
