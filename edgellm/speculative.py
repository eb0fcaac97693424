"""The decoding loop: target-only, speculative (draft model) and lookup (n-gram) decoding.

It knows token ids and positions only; a model is anything with ``length``,
``forward(ids, num_logits) -> (num_logits, V) logits`` and ``rollback(length)`` (see
:class:`edgellm.runtimes.session.DecoderSession`; tests use pure-numpy fakes).

Names as in Leviathan et al.: ``p`` target, ``q`` draft, ``gamma`` drafted tokens per round.
All three modes run the same round; ``target`` mode's proposals are at most one free lookup
token, carried by the row every lone pass has anyway (see :func:`_plan_round`).

Invariants (tested in tests/unit/test_speculative.py):

* every round emits at least one token (the correction or bonus token from the target);
* between rounds the target's cache holds every committed token but the last one: the last
  emitted token is the first input of the next verify batch;
* the draft's cache may lag (by one after a fully accepted round, more after rounds without a
  draft); it catches up by feeding the missing tokens in one batch;
* rollback takes an absolute length;
* prompt plus generated tokens never exceed the target's ``max_context``: a generation that
  reaches it ends with ``finish_reason="length"`` and keeps every token it made (a prompt that
  leaves no room for one new token is refused before any work).
"""

from __future__ import annotations

import time
from typing import Iterator

import numpy as np

from edgellm.controller import DraftLengthController
from edgellm.decode_types import DecodeConfig, DecodeStats, Model, Plan, Proposal, Round
from edgellm.errors import ConfigError, ContextLengthError
from edgellm.lookup import SharedLookup, propose_lookup
from edgellm.prompt_cache import common_prefix
from edgellm.sampling import choose, greedy_accept, probabilities, rejection_accept, sample

def check_prompt_fits(prompt_tokens: int, max_context: int) -> None:
    """Refuse, before any work, a prompt that leaves no room for one new token.

    Raises:
        ContextLengthError: ``prompt_tokens + 1 > max_context``.
    """
    if prompt_tokens + 1 > max_context:
        raise ContextLengthError(
            f"the prompt has {prompt_tokens} tokens; max_context is {max_context} "
            "(prompt plus at least one new token must fit): shorten the prompt or re-export with a "
            "larger --max-context"
        )


def _check_fits(model: Model, extra: int, role: str) -> None:
    if model.length + extra > model.max_context:
        raise ContextLengthError(
            f"{role}: {model.length + extra} tokens do not fit max_context={model.max_context}"
        )


def decode(target: Model, prompt: list[int], cfg: DecodeConfig, draft: Model | None = None,
           stats: DecodeStats | None = None, shared: SharedLookup | None = None) -> Iterator[Round]:
    """Generate tokens after ``prompt``, one :class:`Round` at a time.

    Args:
        target: the target model (its output is what is generated).
        prompt: prompt token ids (at least one).
        cfg: decoding configuration.
        draft: the draft model, required for ``speculative`` mode.
        stats: filled in as the generation goes.
        shared: an index of other requests' tokens, a second source of free proposals beside
            the request's own lookup (read only here; the caller adds the finished sequence).

    Yields:
        Rounds of committed tokens (empty ones between prefill pieces when
        ``cfg.prefill_chunk`` cuts the prompt); the last has ``finish_reason`` ``stop`` (an eos token) or
        ``length`` (max_new_tokens reached, or prompt plus output filled the target's
        ``max_context``: ``stats.context_full``).

    Raises:
        ContextLengthError: the prompt leaves no room for one new token (before any work).
    """
    if not prompt:
        raise ConfigError("the prompt is empty; give at least one token")
    if cfg.mode == "speculative" and draft is None:
        raise ConfigError("mode='speculative' needs a draft model; this bundle has none — use mode='lookup' or 'target'")
    check_prompt_fits(len(prompt), target.max_context)
    stats = stats if stats is not None else DecodeStats()
    rng = np.random.default_rng(cfg.seed)
    stats.cached_tokens = keep = reusable_prefix(target, prompt, cfg.cache_prompt)
    target.rollback(keep)
    if draft is not None:  # the draft catches up on the rest in its first round
        draft.rollback(reusable_prefix(draft, prompt, cfg.cache_prompt))
    eos = set(cfg.eos_token_ids)
    logits = yield from _prefill(target, np.asarray(prompt[keep:], np.int64), cfg, stats)
    seq = list(prompt)
    first = choose(logits, cfg.sampling, rng)
    done = _commit(seq, [first], [False], eos, cfg, stats, len(prompt), target.max_context)
    yield done
    if done.finish_reason:
        return

    # a seeded sampled request's draws follow its proposals: their number must not follow the clock
    clock = cfg.sampling.greedy or cfg.seed is None
    ctl = DraftLengthController(cfg.max_draft_tokens, max_lookup=cfg.max_lookup_tokens, clock=clock)
    while True:
        left = cfg.max_new_tokens - (len(seq) - len(prompt))
        limit = max(0, min(left - 1, target.max_context - len(seq) - 1))  # this round's output fits
        draft_room = draft.max_context - len(seq) if draft is not None else 0  # the draft caches gamma - 1 more
        plan = _plan_round(seq, cfg, ctl, limit, max(0, min(limit, draft_room)), shared)
        rnd = _speculative_round(target, draft, seq, plan, cfg, rng, stats, ctl)
        done = _commit(seq, rnd.tokens, rnd.drafted, eos, cfg, stats, len(prompt), target.max_context)
        yield done
        if done.finish_reason:
            return


def _prefill(target: Model, rest: np.ndarray, cfg: DecodeConfig, stats: DecodeStats) -> Iterator[Round]:
    """The prompt past what is cached (int64 ``(n,)``) through the target, in ``cfg.prefill_chunk``
    pieces with an empty round after each but the last (others' rounds run between them);
    returns the logits ``(V,)`` after the last prompt token, which give the first new token."""
    while cfg.prefill_chunk and len(rest) > cfg.prefill_chunk:
        t0 = time.perf_counter()
        target.forward(rest[: cfg.prefill_chunk], 1)
        stats.prefill_seconds += time.perf_counter() - t0
        rest = rest[cfg.prefill_chunk:]
        yield Round([], [])
    t0 = time.perf_counter()
    logits = target.forward(rest, 1)[-1, : cfg.vocab_size]
    stats.prefill_seconds += time.perf_counter() - t0
    return logits


def reusable_prefix(model: Model, prompt: list[int], enabled: bool = True) -> int:
    """How many of ``prompt``'s first tokens ``model``'s cache holds and may keep.

    At most ``len(prompt) - 1``: the last prompt token always goes through the model, whose
    logits there give the first new token. 0 when disabled or the model does not track its tokens.
    """
    cached = getattr(model, "cached_ids", None)
    if not enabled or cached is None:
        return 0
    return min(common_prefix(cached(), np.asarray(prompt, np.int64)), len(prompt) - 1)


def _lookup(seq: list[int], n: int, shared: SharedLookup | None,
            ctl: DraftLengthController) -> tuple[list[int], str]:
    """Up to ``n`` free proposals: the request's own n-gram match or the shared index's (other
    requests' text), whichever the controller expects more tokens per second from (the shared
    one on a tie: it holds real outputs, where a prompt often holds a template of them)."""
    own = propose_lookup(seq, n)
    other = shared.propose(seq, n) if shared is not None else []
    if not other:
        return own, "lookup"
    if own and ctl.rate(len(own), "lookup") > ctl.rate(len(other), "shared"):
        return own, "lookup"
    return other, "shared"


def _plan_round(seq: list[int], cfg: DecodeConfig, ctl: DraftLengthController, limit: int,
                draft_limit: int, shared: SharedLookup | None = None) -> Plan:
    """Pick this round's proposals: free lookup tokens, or a number of draft tokens to run.

    ``limit`` bounds the proposals by the target's room (and ``max_new_tokens``), ``draft_limit``
    the draft model's by the draft's own context.

    In ``lookup`` mode only lookup is used; in ``speculative`` mode lookup wins when its expected
    rate is higher.
    Lookup takes the request's own n-gram match or ``shared``'s (other requests'), see :func:`_lookup`.

    ``target`` mode, and a speculative round whose draft length comes out 0, propose at most one
    lookup token: a lone token's pass is two rows long anyway (``DecoderSession.min_rows``, for
    exactness), so its second row carries a free proposal instead of a copy of the first; when
    the target agrees, the pass yields two tokens. The proposal is verified like any other, so
    the output is the target's own.
    """
    if cfg.mode == "target":
        look, src = _lookup(seq, min(limit, 1), shared, ctl)
        return Plan(src, tuple(look))
    fixed = cfg.num_draft_tokens
    look, src = _lookup(seq, min(limit, fixed if fixed is not None else ctl.max_lookup), shared, ctl)
    if cfg.mode == "lookup":
        return Plan(src, tuple(look if fixed is not None else look[: max(1, ctl.choose_gamma(len(look), src))]))
    gamma = min(fixed, draft_limit) if fixed is not None else ctl.choose_gamma(draft_limit)
    if look and fixed is None:
        g_look = ctl.choose_gamma(len(look), src)
        if g_look and ctl.rate(g_look, src) > ctl.rate(gamma, "draft"):
            return Plan(src, tuple(look[:g_look]))
    if gamma == 0:
        return Plan(src, tuple(look[:1]))
    return Plan("draft", gamma=gamma)


def _speculative_round(target: Model, draft: Model | None, seq: list[int], plan: Plan, cfg: DecodeConfig,
                       rng: np.random.Generator, stats: DecodeStats, ctl: DraftLengthController) -> Round:
    """One round: 1 propose, 2 verify in one target pass and 3 accept, 4 commit (by the caller), 5 roll back."""
    base = len(seq)  # committed tokens; the target's cache holds base - 1 of them
    t0 = time.perf_counter()
    prop = _propose(draft, seq, plan, cfg, rng)  # 1
    t1 = time.perf_counter()
    n, nxt = _verify_and_accept(target, seq, prop, cfg, rng)  # 2, 3
    t2 = time.perf_counter()
    target.rollback(base + n)  # 5: the target keeps base - 1 + n + 1 - 1 positions
    if draft is not None:
        draft.rollback(min(draft.length, base + n))
    # what the pass cost this sequence: with others in the same call, its share, not the wait
    verify_s = getattr(target, "pass_seconds", None)
    _record(stats, ctl, prop, n, t1 - t0, t2 - t1 if verify_s is None else verify_s)
    return Round(prop.tokens[:n] + [nxt], [True] * n + [False])


def _propose(draft: Model | None, seq: list[int], plan: Plan, cfg: DecodeConfig, rng: np.random.Generator) -> Proposal:
    """The plan's proposals: its free tokens, or ``plan.gamma`` tokens from the draft model."""
    if plan.source != "draft" or not plan.gamma:
        return Proposal(list(plan.tokens), None, plan.source)
    tokens, q, step_s = _draft_tokens(draft, seq, plan.gamma, cfg, rng)
    return Proposal(tokens, q, "draft", step_s)


def _verify_and_accept(target: Model, seq: list[int], prop: Proposal, cfg: DecodeConfig,
                       rng: np.random.Generator) -> tuple[int, int]:
    """Run the last committed token and the proposals through the target in one pass; return how many
    proposals are accepted and the token after them (the target's correction or bonus token).

    Greedy: the longest prefix equal to the target's argmax. Sampling: rejection sampling against
    ``q`` (one-hot for deterministic proposals), so the output follows the target's distribution.
    """
    gamma, v = len(prop.tokens), cfg.vocab_size
    _check_fits(target, gamma + 1, "target")
    logits = target.forward(np.asarray(seq[-1:] + prop.tokens, np.int64), gamma + 1)[:, :v]
    proposals = np.asarray(prop.tokens, np.int64)
    if cfg.sampling.greedy:
        return greedy_accept(proposals, logits.argmax(-1))
    p = probabilities(logits, cfg.sampling)
    q = prop.q
    if q is None:
        q = np.zeros((gamma, p.shape[1]))
        q[np.arange(gamma), proposals] = 1.0
    return rejection_accept(proposals, q, p, rng)


def _record(stats: DecodeStats, ctl: DraftLengthController, prop: Proposal, accepted: int, draft_s: float,
            verify_s: float) -> None:
    """The round's bookkeeping: statistics, and what the controller learns from it."""
    gamma = len(prop.tokens)
    stats.rounds += 1
    stats.drafted_tokens += gamma
    stats.accepted_tokens += accepted
    if gamma:
        by = stats.by_source.setdefault(prop.source, [0, 0])
        by[0], by[1] = by[0] + gamma, by[1] + accepted
    stats.draft_seconds += draft_s
    stats.verify_seconds += verify_s
    stats.verify_calls += 1
    stats.gammas.append(gamma)
    ctl.observe(gamma, accepted, prop.draft_step_s, verify_s, prop.source)


def _draft_tokens(draft: Model, seq: list[int], gamma: int, cfg: DecodeConfig,
                  rng: np.random.Generator) -> tuple[list[int], np.ndarray | None, float]:
    """Run the draft ``gamma`` steps after catching it up with ``seq``.

    Returns:
        The proposed tokens, their distributions q ``(gamma, V)`` when sampling (else None), and
        the draft's seconds per proposed token, the catch-up of a long backlog excluded.
    """
    v, greedy = cfg.vocab_size, cfg.sampling.greedy
    _check_fits(draft, len(seq) - draft.length + gamma, "draft")
    if len(seq) - draft.length > 2:  # long backlog (prompt, lookup rounds): one batch, timed apart
        draft.forward(np.asarray(seq[draft.length : -1], np.int64), 1)
    t0 = time.perf_counter()
    feed = seq[draft.length :]  # usually one token, two after a fully accepted round
    tokens, qs = [], []
    for _ in range(gamma):
        logits = draft.forward(np.asarray(feed, np.int64), 1)[-1, :v]
        if greedy:
            tok = int(np.argmax(logits))
        else:
            qi = probabilities(logits, cfg.sampling)
            tok = sample(qi, rng)
            qs.append(qi)
        tokens.append(tok)
        feed = [tok]
    return tokens, (np.stack(qs) if qs else None), (time.perf_counter() - t0) / gamma


def _commit(seq: list[int], tokens: list[int], drafted: list[bool], eos: set[int], cfg: DecodeConfig,
            stats: DecodeStats, prompt_len: int, max_context: int) -> Round:
    """4. commit: append the round's tokens, cutting at eos, at max_new_tokens and at a full context."""
    out, flags, reason = [], [], None
    for tok, d in zip(tokens, drafted):
        if tok in eos:
            reason = "stop"
            break
        out.append(tok)
        flags.append(d)
        if len(seq) + len(out) - prompt_len >= cfg.max_new_tokens:
            reason = "length"
            break
        if len(seq) + len(out) >= max_context:
            reason = "length"
            stats.context_full = True
            break
    seq.extend(out)
    stats.emitted_tokens += len(out)
    return Round(out, flags, reason)
