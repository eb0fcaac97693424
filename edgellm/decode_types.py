"""The values the decoding loop (:mod:`edgellm.speculative`) works with: the model it drives, its
configuration, a round's plan and proposals, what a round commits, and the statistics."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from edgellm.errors import ConfigError
from edgellm.options import MODES
from edgellm.sampling import SamplingConfig

MAX_SEED = 2**63 - 1


class Model(Protocol):
    length: int
    max_context: int

    def forward(self, token_ids: np.ndarray, num_logits: int = 1) -> np.ndarray: ...

    def rollback(self, length: int) -> None: ...

    # optional: ``cached_ids() -> int64 (length,)``, the cached tokens (enables prompt caching);
    # ``pass_seconds``, what the last forward cost this sequence (its share of a batched call)


@dataclass(frozen=True)
class DecodeConfig:
    """Everything the loop needs besides the models and the prompt.

    Attributes:
        mode: ``target``, ``speculative`` or ``lookup``.
        max_new_tokens: stop after this many tokens.
        sampling: temperature / top-k / top-p (greedy when temperature is 0).
        num_draft_tokens: fixed gamma, or ``None`` for the adaptive controller.
        max_draft_tokens: upper bound of the adaptive gamma for draft-model proposals.
        max_lookup_tokens: upper bound for lookup proposals (free to make, so longer: a copied
            span is often accepted whole).
        eos_token_ids: tokens that end generation (not emitted).
        vocab_size: tokenizer size; logits columns past it (vocabulary padding) are ignored.
        seed: random seed for sampling.
        cache_prompt: keep the cached prefix the prompt shares with what the models' caches hold
            and prefill only the rest (:mod:`edgellm.prompt_cache`; the output is the same).
        prefill_chunk: prefill a longer prompt in passes of this many tokens, yielding an empty
            round after each but the last (a scheduler runs other sequences' rounds in between);
            ``None``: one pass. The output is the same.
    """

    mode: str = "speculative"
    max_new_tokens: int = 128
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    num_draft_tokens: int | None = None
    max_draft_tokens: int = 8
    max_lookup_tokens: int = 16
    eos_token_ids: tuple[int, ...] = ()
    vocab_size: int | None = None
    seed: int | None = None
    cache_prompt: bool = True
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ConfigError(f"mode={self.mode!r}; allowed: {', '.join(MODES)}", param="mode")
        m = self.max_new_tokens
        if not isinstance(m, int) or isinstance(m, bool) or m < 1:
            raise ConfigError(f"max_new_tokens={m!r}; allowed: an integer >= 1 (generation also stops when "
                              "the context is full)", param="max_new_tokens")
        n = self.num_draft_tokens
        if n is not None and (not isinstance(n, int) or isinstance(n, bool) or not 0 <= n <= 64):
            raise ConfigError(f"num_draft_tokens={n!r}; allowed: an integer 0-64, or None for adaptive",
                              param="num_draft_tokens")
        if not isinstance(self.cache_prompt, bool):
            raise ConfigError(f"cache_prompt={self.cache_prompt!r}; allowed: true or false", param="cache_prompt")
        c = self.prefill_chunk
        if c is not None and (not isinstance(c, int) or isinstance(c, bool) or c < 2):
            raise ConfigError(f"prefill_chunk={c!r}; allowed: an integer >= 2, or None for one pass",
                              param="prefill_chunk")
        s = self.seed
        if s is not None and (not isinstance(s, int) or isinstance(s, bool) or not 0 <= s <= MAX_SEED):
            raise ConfigError(f"seed={s!r}; allowed: an integer 0-{MAX_SEED}, or None for a random seed",
                              param="seed")


@dataclass
class Round:
    """Tokens one round committed. ``drafted[i]``: token i was proposed and accepted."""

    tokens: list[int]
    drafted: list[bool]
    finish_reason: str | None = None


@dataclass(frozen=True)
class Plan:
    """What a round will propose: ``tokens`` from a free source (``lookup``, ``shared``), or
    ``gamma`` tokens the draft model is to run (``source == "draft"``); nothing: a plain step."""

    source: str
    tokens: tuple[int, ...] = ()
    gamma: int = 0


@dataclass(frozen=True)
class Proposal:
    """A round's proposals.

    Attributes:
        tokens: the proposed token ids.
        q: their distributions ``(len(tokens), V)`` when the draft sampled them; ``None`` for
            deterministic proposals (greedy draft, lookup), one-hot for rejection sampling.
        source: ``draft``, ``lookup`` or ``shared``.
        draft_step_s: the draft's seconds per proposed token (``None`` when no draft ran).
    """

    tokens: list[int]
    q: np.ndarray | None
    source: str
    draft_step_s: float | None = None


@dataclass
class DecodeStats:
    rounds: int = 0
    drafted_tokens: int = 0
    accepted_tokens: int = 0
    emitted_tokens: int = 0
    prefill_seconds: float = 0.0
    draft_seconds: float = 0.0
    verify_seconds: float = 0.0
    draft_steps: int = 0
    verify_calls: int = 0
    gammas: list[int] = field(default_factory=list)
    context_full: bool = False  # the generation stopped because prompt + output filled max_context
    cached_tokens: int = 0  # prompt tokens the target's cache already held (not prefilled again)
    by_source: dict[str, list[int]] = field(default_factory=dict)  # source -> [proposed, accepted]

    @property
    def acceptance_rate(self) -> float | None:
        return self.accepted_tokens / self.drafted_tokens if self.drafted_tokens else None
