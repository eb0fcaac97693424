"""The accept/reject math of speculative decoding, as pure numpy functions.

Names follow Leviathan et al. 2022 (arXiv 2211.17192) throughout edgellm's decoding code:
``p`` is the TARGET model's distribution, ``q`` the DRAFT's, ``gamma`` the number of drafted
tokens. (Some well-known implementations swap p and q; we do not.)

Both distributions pass through the same processing (:func:`probabilities`: temperature, top-k,
top-p) before ratios are computed, so the accepted tokens follow the processed target
distribution exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from edgellm.errors import ConfigError


MAX_TEMPERATURE = 100.0  # far past any useful value (OpenAI allows 0-2); keeps the arithmetic finite


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


@dataclass(frozen=True)
class SamplingConfig:
    """How the next token is chosen. ``temperature == 0`` means greedy (argmax).

    Attributes:
        temperature: >= 0; 0 is greedy.
        top_k: keep the k most likely tokens (0 = all).
        top_p: keep the smallest set of tokens whose probability reaches top_p (1.0 = all).
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        t, k, p = self.temperature, self.top_k, self.top_p
        if not _is_number(t) or not math.isfinite(t) or t < 0 or t > MAX_TEMPERATURE:
            raise ConfigError(f"temperature={t!r}; allowed: a number 0-{MAX_TEMPERATURE:g} (0 = greedy)",
                              param="temperature")
        if not isinstance(k, int) or isinstance(k, bool) or k < 0:
            raise ConfigError(f"top_k={k!r}; allowed: an integer >= 0 (0 = no top-k)", param="top_k")
        if not _is_number(p) or not 0.0 < p <= 1.0:
            raise ConfigError(f"top_p={p!r}; allowed: a number with 0 < top_p <= 1 (1 = no top-p; for the single "
                              "most likely token use temperature 0)", param="top_p")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def probabilities(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Processed next-token distributions.

    Args:
        logits: float ``(n, V)`` or ``(V,)``.
        cfg: a non-greedy sampling configuration.

    Returns:
        float64 array of the same shape, rows summing to 1, zero outside top-k / top-p.
    """
    x = np.asarray(logits, np.float64)
    # subtract the maximum before dividing: a tiny temperature (1e-310) then gives 0 for the top
    # token and -inf for the others (greedy in the limit), never inf - inf = NaN
    with np.errstate(over="ignore"):
        x = (x - x.max(axis=-1, keepdims=True)) / cfg.temperature
    if cfg.top_k and cfg.top_k < x.shape[-1]:
        kth = np.partition(x, -cfg.top_k, axis=-1)[..., -cfg.top_k, None]
        x = np.where(x < kth, -np.inf, x)
    probs = np.exp(x)
    probs /= probs.sum(axis=-1, keepdims=True)
    if cfg.top_p < 1.0:
        order = np.argsort(-probs, axis=-1)
        sorted_p = np.take_along_axis(probs, order, axis=-1)
        # keep a token if the mass strictly before it is below top_p (the top token always stays)
        keep_sorted = (np.cumsum(sorted_p, axis=-1) - sorted_p) < cfg.top_p
        keep = np.zeros_like(keep_sorted)
        np.put_along_axis(keep, order, keep_sorted, axis=-1)
        probs = np.where(keep, probs, 0.0)
        probs /= probs.sum(axis=-1, keepdims=True)
    return probs


def sample(probs: np.ndarray, rng: np.random.Generator) -> int:
    """Draw one token id from a ``(V,)`` distribution."""
    c = np.cumsum(probs)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(probs) - 1))


def greedy_accept(draft_tokens: np.ndarray, target_argmax: np.ndarray) -> tuple[int, int]:
    """Greedy verification.

    Args:
        draft_tokens: int ``(gamma,)`` proposed tokens.
        target_argmax: int ``(gamma + 1,)``; entry i is the target's choice after the prefix
            plus ``draft_tokens[:i]``.

    Returns:
        ``(n, token)``: the first ``n`` drafts are accepted and ``token`` (the target's own
        choice at position n: a correction, or the bonus token when ``n == gamma``) follows.
    """
    gamma = len(draft_tokens)
    mismatch = np.nonzero(np.asarray(draft_tokens) != np.asarray(target_argmax[:gamma]))[0]
    n = int(mismatch[0]) if len(mismatch) else gamma
    return n, int(target_argmax[n])


def residual(p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """Normalized ``max(p - q, 0)``: where to sample after rejecting a draft token. ``(V,)``."""
    r = np.maximum(p - q, 0.0)
    total = r.sum()
    if total <= 0.0:  # p == q up to rounding: a rejection is then (almost) impossible; use p
        return p
    return r / total


def rejection_accept(draft_tokens: np.ndarray, q: np.ndarray, p: np.ndarray,
                     rng: np.random.Generator) -> tuple[int, int]:
    """Speculative sampling (Leviathan et al. 2022, Algorithm 1; Chen et al. 2023).

    Draft token ``x_i`` is accepted with probability ``min(1, p_i(x_i) / q_i(x_i))``; at the
    first rejection the replacement is drawn from ``residual(p_i, q_i)``; if all ``gamma`` are
    accepted a bonus token is drawn from ``p_gamma``. The emitted tokens are distributed exactly
    as tokens sampled from ``p`` one at a time.

    Args:
        draft_tokens: int ``(gamma,)``, ``draft_tokens[i]`` drawn from ``q[i]``.
        q: float ``(gamma, V)`` processed draft distributions (a one-hot row for a deterministic
            proposal, e.g. prompt lookup).
        p: float ``(gamma + 1, V)`` processed target distributions.
        rng: random generator.

    Returns:
        ``(n, token)`` as in :func:`greedy_accept`.
    """
    gamma = len(draft_tokens)
    for i in range(gamma):
        x = int(draft_tokens[i])
        px, qx = p[i, x], q[i, x]
        if qx > 0 and rng.random() * qx < px:  # u < p/q without dividing
            continue
        return i, sample(residual(p[i], q[i]), rng)
    return gamma, sample(p[gamma], rng)


def choose(logits: np.ndarray, cfg: SamplingConfig, rng: np.random.Generator) -> int:
    """Pick the next token from one ``(V,)`` row of logits."""
    if cfg.greedy:
        return int(np.argmax(logits))
    return sample(probabilities(logits, cfg), rng)
