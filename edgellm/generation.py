"""One generation as its caller sees it: the options it takes, the text events it streams, its result.

:class:`GenerationOptions` is what the API (``llm.generate(prompt, options)``), the server (one
per request) and the CLI (its flags) build, and what validates every choice; :class:`TextStream`
turns the decoding loop's rounds of token ids into text events (stop strings, characters held
back until complete); :func:`stats_dict` flattens the loop's statistics.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

from edgellm.decode_types import DecodeConfig, DecodeStats, Round
from edgellm.errors import ConfigError
from edgellm.sampling import SamplingConfig
from edgellm.tokenizer import StreamDecoder, TextTokenizer


@dataclass(frozen=True)
class GenerationOptions:
    """Every choice a caller makes about one generation, validated when the object is made.

    Attributes:
        mode: ``speculative`` (a draft model proposes), ``target`` (the baseline) or ``lookup``
            (n-gram proposals, no draft); ``None``: speculative when the bundle has a draft, else target.
        max_new_tokens: at most this many new tokens (>= 1); ``None``: the bundle's
            ``generation.max_new_tokens``. Generation also ends when the context is full.
        temperature: 0 (greedy) to 100.
        top_k: keep the k most likely tokens (0: all).
        top_p: keep the most likely tokens up to this probability, in (0, 1] (1: all).
        seed: sampling seed, 0 to 2**63 - 1 (``None``: random); a seed gives the same text each run.
        num_draft_tokens: proposals per round, 0-64; ``None``: the controller chooses each round.
        stop: strings that end the generation (the text ends before the first one); a single
            string is taken as one stop string, ``None`` as none.
        adapter: a LoRA adapter of the bundle (``None``: the base model).
        cache_prompt: reuse the cached prefix a prompt shares with earlier ones (same output).
        prefill_chunk: prefill a longer prompt in passes of this many tokens (``None``: one pass).
    """

    mode: str | None = None
    max_new_tokens: int | None = None
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    num_draft_tokens: int | None = None
    stop: tuple[str, ...] | None = ()
    adapter: str | None = None
    cache_prompt: bool = True
    prefill_chunk: int | None = None

    def __post_init__(self) -> None:
        stop = (self.stop,) if isinstance(self.stop, str) else () if self.stop is None else self.stop
        if not isinstance(stop, (list, tuple)) or any(not isinstance(s, str) or not s for s in stop):
            raise ConfigError(f"stop={self.stop!r}; allowed: a non-empty string or a list of them", param="stop")
        for s in stop:
            check_text(s, "a stop string", param="stop")
        object.__setattr__(self, "stop", tuple(stop))
        if self.adapter is not None and not isinstance(self.adapter, str):
            raise ConfigError(f"adapter={self.adapter!r}; allowed: an adapter's name, or None for the base model",
                              param="adapter")
        self.decode_config(default_mode="speculative", default_max_new_tokens=1)  # checks every other field

    @classmethod
    def of(cls, options: GenerationOptions | None = None, **overrides: Any) -> GenerationOptions:
        """``options`` (default: all defaults) with the fields named in ``overrides`` replaced.

        Raises:
            ConfigError: a name that is not a field (the message lists the fields), or a bad value.
        """
        unknown = sorted(set(overrides) - FIELDS)
        if unknown:
            raise ConfigError(f"unknown generation option {', '.join(map(repr, unknown))}; allowed: "
                              f"{', '.join(f.name for f in dataclasses.fields(cls))}", param=unknown[0])
        if options is None:
            return cls(**overrides)
        if not isinstance(options, cls):
            raise ConfigError(f"options of type {type(options).__name__}; allowed: a GenerationOptions or None",
                              param="options")
        return dataclasses.replace(options, **overrides) if overrides else options

    def decode_config(self, *, default_mode: str, default_max_new_tokens: int, eos_token_ids: Sequence[int] = (),
                      vocab_size: int | None = None) -> DecodeConfig:
        """The decoding loop's configuration, with the bundle's defaults and facts filled in."""
        return DecodeConfig(
            mode=self.mode if self.mode is not None else default_mode,
            max_new_tokens=self.max_new_tokens if self.max_new_tokens is not None else default_max_new_tokens,
            sampling=SamplingConfig(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p),
            num_draft_tokens=self.num_draft_tokens,
            eos_token_ids=tuple(eos_token_ids),
            vocab_size=vocab_size,
            seed=self.seed,
            cache_prompt=self.cache_prompt,
            prefill_chunk=self.prefill_chunk,
        )


FIELDS = frozenset(f.name for f in dataclasses.fields(GenerationOptions))


@dataclass
class GenerationResult:
    """What :meth:`edgellm.LLM.generate` returns.

    Attributes:
        text: the generated text (prompt excluded).
        token_ids: the generated token ids (prompt and eos excluded).
        finish_reason: ``stop`` (eos or a stop string) or ``length``.
        stats: timings and speculation statistics (see :func:`stats_dict`).
        drafted: per generated token, whether it was a draft proposal the target accepted.
    """

    text: str
    token_ids: list[int]
    finish_reason: str
    stats: dict[str, Any]
    drafted: list[bool] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "token_ids": self.token_ids, "finish_reason": self.finish_reason,
                "stats": self.stats}


@dataclass
class StreamEvent:
    """One generated token of a streamed generation; the last event carries ``result``.

    Attributes:
        text: text decided by this token (may be empty: a multi-byte character or a possible
            stop string is held back until it is complete).
        token_ids: ``[token]``, or ``[]`` for the final event.
        drafted: ``[True]`` when the token was a proposal (draft or lookup) the target accepted.
        result: the whole :class:`GenerationResult`, on the final event only.
        round_end: the last token of a decoding round (the next event costs a model pass);
            the server's scheduler switches sequences here.
    """

    text: str
    token_ids: list[int]
    drafted: list[bool]
    result: GenerationResult | None = None
    round_end: bool = False


class TextStream:
    """The text of a generation, token by token: what may be shown yet, and where it stops.

    A stop string ends the text before it (finish reason ``stop``); text that could be the start
    of a stop string, or part of a multi-byte character, is held back until it is decided.
    """

    def __init__(self, tokenizer: TextTokenizer, stop: Sequence[str] = ()) -> None:
        self.decoder, self.stops = StreamDecoder(tokenizer), list(stop)
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.text, self.sent = "", 0
        self.token_ids: list[int] = []
        self.drafted: list[bool] = []
        self.finish_reason: str | None = None
        self.stopped = False  # a stop string was found: the caller stops decoding

    def push(self, rnd: Round) -> Iterator[StreamEvent]:
        """The events of one round: one per token (a round that only ends the generation, at an eos,
        has no token but still gives one event); a prefill piece gives one empty event."""
        if not rnd.tokens and rnd.finish_reason is None:  # a prefill piece: a turn boundary, no text
            yield StreamEvent("", [], [], round_end=True)
            return
        steps = list(zip(rnd.tokens, rnd.drafted)) or [(None, False)]
        for i, (tok, was_drafted) in enumerate(steps):
            last = rnd.finish_reason is not None and i == len(steps) - 1
            if tok is not None:
                self.token_ids.append(tok)
                self.drafted.append(was_drafted)
                self.text += self.decoder.push([tok])
            if last:
                self.text += self.decoder.flush()
                self.finish_reason = rnd.finish_reason
            cut = find_stop(self.text, self.stops)
            if cut is not None:
                self.text, self.finish_reason, self.stopped = self.text[:cut], "stop", True
            safe = len(self.text) if (self.stopped or last) else max(self.sent, len(self.text) - self.hold)
            if safe > self.sent or tok is not None:
                yield StreamEvent(self.text[self.sent:safe], [] if tok is None else [tok],
                                  [] if tok is None else [was_drafted], round_end=i == len(steps) - 1)
                self.sent = safe
            if self.stopped:
                return


def check_text(text: str, what: str, *, param: str = "prompt") -> str:
    """``text`` itself, or a ConfigError when it is not valid Unicode.

    A lone surrogate (``"\\ud800"`` in JSON, or undecodable bytes in a command line, which
    Python keeps as surrogates) cannot be encoded to UTF-8, so the tokenizer could not read it.
    """
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = text[e.start:e.end]
        raise ConfigError(f"{what} is not valid Unicode text: {bad!r} at character {e.start} (a lone surrogate, "
                          "or bytes that are not UTF-8); allowed: UTF-8 text", param=param) from None
    return text


def find_stop(text: str, stops: Sequence[str]) -> int | None:
    """Where the first of ``stops`` starts in ``text`` (``None``: none there)."""
    hits = [i for i in (text.find(s) for s in stops) if i >= 0]
    return min(hits) if hits else None


def stats_dict(stats: DecodeStats, cfg: DecodeConfig, prompt_tokens: int, t0: float, t_first: float | None,
               t_end: float) -> dict[str, Any]:
    """Flatten :class:`DecodeStats` into the documented ``stats`` fields."""
    n = stats.emitted_tokens
    t_first = t_first or t_end
    decode_s = t_end - t_first
    rounds = max(stats.rounds, 1)
    return {
        "mode": cfg.mode,
        "prompt_tokens": prompt_tokens,
        "generated_tokens": n,
        "time_to_first_token_s": t_first - t0,
        "total_s": t_end - t0,
        # decode speed: tokens after the first one over the time after the first one
        "tokens_per_second": (n - 1) / decode_s if n > 1 and decode_s > 0 else None,
        "acceptance_rate": stats.acceptance_rate,
        "mean_tokens_per_round": (n - 1) / stats.rounds if stats.rounds else None,
        "rounds": stats.rounds,
        "drafted_tokens": stats.drafted_tokens,
        "accepted_tokens": stats.accepted_tokens,
        "draft_ms_per_round": 1e3 * stats.draft_seconds / rounds if stats.rounds else None,
        "verify_ms_per_round": 1e3 * stats.verify_seconds / rounds if stats.rounds else None,
        "target_ms_per_step": 1e3 * stats.verify_seconds / stats.verify_calls if cfg.mode == "target" and stats.verify_calls else None,
        "mean_gamma": sum(stats.gammas) / len(stats.gammas) if stats.gammas else None,
        "context_full": stats.context_full,
        "cached_tokens": stats.cached_tokens,
        "proposals_by_source": {k: {"proposed": v[0], "accepted": v[1]} for k, v in stats.by_source.items()},
    }
