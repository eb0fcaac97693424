"""The public Python API: ``edgellm.load(bundle)`` -> :class:`LLM`."""

from __future__ import annotations

import logging
import os
import threading
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, NamedTuple, Sequence

import numpy as np

from edgellm.bundle import check_bundle, read_manifest
from edgellm.decode_types import DecodeConfig, DecodeStats, Round
from edgellm.errors import BundleError, ConfigError
from edgellm.generation import (GenerationOptions, GenerationResult, StreamEvent, TextStream, check_text,
                                stats_dict)
from edgellm.lookup import SharedLookup
from edgellm.manifest import Manifest, ModelEntry
from edgellm.options import DEFAULT_MAX_NEW_TOKENS, GRAPH_FORMATS
from edgellm.prompt_cache import Entry, PromptCache, common_prefix
from edgellm.speculative import decode
from edgellm.tokenizer import TextTokenizer

if TYPE_CHECKING:
    from edgellm.runtimes.batched import PassGate

logger = logging.getLogger(__name__)


#: live cached tokens a new prompt may overwrite before they are stored in the prompt cache
#: first (fewer: the same conversation going on, whose re-rendered last turn differs a little)
KEEP_WHEN_LOSING = 32

class LLM:
    """A loaded bundle: target (and draft) sessions, tokenizer, defaults."""

    def __init__(self, bundle: Path, manifest: Manifest, *, provider: str = "cpu", draft_provider: str | None = None,
                 threads: int | None = None, fallback: bool = False, graph_format: str = "onnx",
                 prompt_cache_bytes: int = 0, shared_lookup_tokens: int = 0, max_batch: int = 1) -> None:
        from edgellm.runtimes.providers import resolve_provider

        if not isinstance(max_batch, int) or isinstance(max_batch, bool) or not 1 <= max_batch <= 64:
            raise ConfigError(f"max_batch={max_batch!r}; allowed: an integer 1-64", param="max_batch")

        self.bundle, self.manifest = bundle, manifest
        self.prompt_cache = PromptCache(prompt_cache_bytes)
        self.shared_lookup = SharedLookup(shared_lookup_tokens)
        self.tokenizer = TextTokenizer(bundle, manifest)
        threads = threads or os.cpu_count() or 1
        t0 = time.perf_counter()
        target_p = resolve_provider(provider, fallback=fallback)
        # min_rows=2: the target computes a position alike whether it decodes alone or verifies
        # a draft (see DecoderSession), so speculative output equals target-mode output exactly
        # with several slots and a batch graph, only the batch graph is loaded (one copy of the weights)
        batch = max_batch > 1 and manifest.target.batch_graph is not None and graph_format == "onnx"
        self.target = _Bound(_session(bundle, manifest.target, graph_format, target_p, threads, min_rows=2,
                                      open_graph=not batch), manifest.target)
        self.draft = None
        if manifest.draft is not None:
            draft_p = resolve_provider(draft_provider or provider, fallback=fallback)
            self.draft = _Bound(_session(bundle, manifest.draft, graph_format, draft_p, threads), manifest.draft)
        self.adapters = _adapters(bundle, manifest)
        self.slots = [Slot(self.target, self.draft)] + [self._fork_slot() for _ in range(max_batch - 1)]
        self.gate = self._gate(manifest.target, target_p, threads) if max_batch > 1 else None
        self._lock = threading.Lock()  # the prompt cache, swapped by generations on several threads
        self.load_seconds = time.perf_counter() - t0
        self.providers = {"target": target_p.name, "draft": draft_p.name if self.draft else None}

    def _fork_slot(self) -> Slot:
        if not hasattr(self.target.session, "fork"):
            raise ConfigError("max_batch > 1 needs a bundle with dynamic graphs (a cpu or gpu export); this "
                              "bundle's static npu graphs hold one sequence", param="max_batch")
        return Slot(self.target.fork(), self.draft.fork() if self.draft is not None else None)

    @property
    def batched(self) -> bool:
        """Whether the slots' target passes run as one call of the bundle's batch graph (else in turn)."""
        from edgellm.runtimes.batched import run_each

        return self.gate is not None and self.gate.runner is not run_each

    def _gate(self, entry: ModelEntry, provider, threads: int) -> PassGate:
        """The gate every slot's target passes go through: one call of the bundle's batch graph for
        the passes of all generations in flight, or (without one) each pass alone in turn."""
        from edgellm.runtimes.batched import BatchedGraph, PassGate, run_each

        sessions = [slot.target.session for slot in self.slots]
        runner = run_each
        if sessions[0].session is None:  # opened without its own graph: the batch graph computes every pass
            graph = BatchedGraph(self.bundle / entry.batch_graph, sessions[0].layout, provider, threads,
                                 entry.batch_slots)
            runner = graph.run
            for s in sessions:
                s.providers, s.load_seconds = graph.session.get_providers(), graph.load_seconds
        else:
            logger.info("no batch graph for this bundle (re-export it to get one): the %d slots' passes take "
                        "turns", len(sessions))
        gate = PassGate(runner)
        for s in sessions:
            s.gate = gate
        return gate

    def pick_slot(self, prompt_ids: Sequence[int], free: Sequence[int], adapter: str | None = None) -> int:
        """The slot of ``free`` whose live cache (computed with ``adapter``) shares the longest prefix
        with ``prompt_ids`` (a chat's next turn finds its own conversation); the first one on a tie."""
        prompt = np.asarray(prompt_ids, np.int64)
        return max(free, key=lambda k: (_live_prefix(self.slots[k].target.session, prompt, adapter), -k))

    def check_adapter(self, adapter: str | None) -> Adapter | None:
        """The branch matrices of ``adapter`` (``None``: the base model, no matrices).

        Raises:
            ConfigError: the bundle has no adapter of that name (the message lists those it has).
        """
        if adapter is None:
            return None
        if adapter not in self.adapters:
            have = ", ".join(sorted(self.adapters)) or "none (add one with `edgellm add-lora`)"
            raise ConfigError(f"adapter={adapter!r} is not in this bundle; its adapters: {have}", param="adapter")
        return self.adapters[adapter]

    # ------------------------------------------------------------------ prompts
    def prompt_ids(self, prompt: str | list[dict[str, str]]) -> list[int]:
        """Token ids of a prompt string, or of chat messages rendered with the chat template."""
        if isinstance(prompt, str):
            if not prompt:
                raise ConfigError("the prompt is empty; give some text", param="prompt")
            return self.tokenizer.encode(check_text(prompt, "the prompt"))
        if not isinstance(prompt, list):
            raise ConfigError(f"prompt of type {type(prompt).__name__}; allowed: a string, or a list of "
                              "{'role': ..., 'content': ...} messages", param="prompt")
        text = self.tokenizer.apply_chat_template(prompt)
        return self.tokenizer.encode(check_text(text, "the chat messages"), add_special_tokens=False)

    def decode_config(self, options: GenerationOptions | None = None, /, **overrides: Any) -> DecodeConfig:
        """The decoding loop's configuration for ``options`` (fields in ``overrides`` replaced), with
        this bundle's defaults (mode, ``max_new_tokens``), end-of-text tokens and vocabulary size."""
        opts = GenerationOptions.of(options, **overrides)
        return opts.decode_config(default_mode="speculative" if self.draft else "target",
                                  default_max_new_tokens=int(self.manifest.generation.get("max_new_tokens",
                                                                                          DEFAULT_MAX_NEW_TOKENS)),
                                  eos_token_ids=self.tokenizer.eos_token_ids, vocab_size=self.tokenizer.vocab_size)

    # ------------------------------------------------------------------ generation
    def generate_tokens(self, prompt_ids: Sequence[int], cfg: DecodeConfig,
                        stats: DecodeStats | None = None, slot: int = 0, adapter: str | None = None) -> Iterator[Round]:
        """The low-level generator: rounds of committed token ids (see :func:`edgellm.speculative.decode`).

        ``slot``: which of the ``max_batch`` caches to use; generations in different slots may
        take turns round by round (the server does) without disturbing each other.
        ``adapter``: the LoRA adapter the target computes with (``None``: the base model); the
        draft computes with the adapter's draft part if it has one, else as the base's draft.
        """
        values = self.check_adapter(adapter)
        if cfg.mode == "speculative" and self.draft is None:
            raise ConfigError("mode='speculative' needs a draft model, and this bundle has none; "
                              "use mode='lookup' (draft-free) or 'target'")
        if not isinstance(slot, int) or not 0 <= slot < len(self.slots):
            raise ConfigError(f"slot={slot!r}; allowed: 0-{len(self.slots) - 1} (max_batch={len(self.slots)})",
                              param="slot")
        target, draft = self.slots[slot]
        if cfg.cache_prompt:
            with self._lock:
                self._swap_prompt_cache(np.asarray(prompt_ids, np.int64), target, draft, adapter)
        _bind_adapter(target, draft, adapter, values)  # empties a cache whose adapter changes
        # a seeded sampled request must not depend on other requests: its samples follow its proposals
        seeded = not cfg.sampling.greedy and cfg.seed is not None
        shared = self.shared_lookup if self.shared_lookup.max_tokens and not seeded else None
        rounds = decode(target, list(prompt_ids), cfg, draft=draft, stats=stats, shared=shared)
        return rounds if shared is None else self._remembered(list(prompt_ids), rounds)

    def _remembered(self, prompt_ids: list[int], rounds: Iterator[Round]) -> Iterator[Round]:
        """``rounds``, adding the prompt and what was generated to :attr:`shared_lookup` at the end."""
        out: list[int] = []
        try:
            for rnd in rounds:
                out.extend(rnd.tokens)
                yield rnd
        finally:  # also when the consumer stops early (a stop string, a client gone)
            self.shared_lookup.add(prompt_ids + out)

    def _swap_prompt_cache(self, prompt: np.ndarray, target: _Bound, draft: _Bound | None,
                           adapter: str | None = None) -> None:
        """Before a generation: bring in the stored caches that share most with ``prompt`` (int64 ``(n,)``).

        The live caches go into :attr:`prompt_cache` when a stored entry shares more with the
        prompt than they do, or when the prompt would overwrite more than
        :data:`KEEP_WHEN_LOSING` of their tokens (another conversation, or another ``adapter``);
        the next turn of the same conversation just goes on in them, copying nothing.
        """
        t = target.session
        if not self.prompt_cache.max_bytes or not t.reuses_prefix:
            return
        live = _live_prefix(t, prompt, adapter)
        entry = self.prompt_cache.take_best(prompt, better_than=live, adapter=adapter)
        if entry is None and t.length - live <= KEEP_WHEN_LOSING:
            return
        d = draft.session if draft is not None and draft.session.reuses_prefix else None
        if t.length:
            self.prompt_cache.store(Entry(t.snapshot(), d.snapshot() if d is not None else None, t.adapter))
        if entry is not None:
            _bind_adapter(target, draft, adapter, self.check_adapter(adapter))
            t.restore(entry.target)
            if d is not None and entry.draft is not None:
                d.restore(entry.draft)
            elif draft is not None:
                draft.rollback(0)

    def stream_events(self, prompt: str | list[dict[str, str]], options: GenerationOptions | None = None, /, *,
                      slot: int = 0, prompt_ids: Sequence[int] | None = None, **overrides: Any) -> Iterator[StreamEvent]:
        """Stream :class:`StreamEvent` pieces, one per token; the last one carries the :class:`GenerationResult`.

        Args:
            prompt: as for :meth:`generate`.
            options: how to generate (:class:`GenerationOptions`; default: all defaults).
            slot: which cache slot to use (see :meth:`generate_tokens`).
            prompt_ids: ``prompt`` already tokenized with :meth:`prompt_ids` (the server has it).
            **overrides: :class:`GenerationOptions` fields replacing those of ``options``.
        """
        opts = GenerationOptions.of(options, **overrides)
        cfg = self.decode_config(opts)
        self.check_adapter(opts.adapter)
        ids = list(prompt_ids) if prompt_ids is not None else self.prompt_ids(prompt)
        stats, text = DecodeStats(), TextStream(self.tokenizer, opts.stop)
        t0, t_first = time.perf_counter(), None
        for rnd in self.generate_tokens(ids, cfg, stats, slot=slot, adapter=opts.adapter):
            if rnd.tokens or rnd.finish_reason is not None:
                t_first = t_first or time.perf_counter()
            yield from text.push(rnd)
            if text.stopped:
                break
        t_end = time.perf_counter()
        result = GenerationResult(text.text, text.token_ids, text.finish_reason or "length",
                                  stats_dict(stats, cfg, len(ids), t0, t_first, t_end) | {"adapter": opts.adapter},
                                  text.drafted)
        yield StreamEvent("", [], [], result)

    def generate(self, prompt: str | list[dict[str, str]], options: GenerationOptions | None = None, /,
                 **overrides: Any) -> GenerationResult:
        """Generate a completion of ``prompt`` (a string, or chat messages).

        Args:
            prompt: text, or ``[{"role": "user", "content": "..."}]`` (rendered with the chat template).
            options: how to generate: mode, length, sampling, seed, stop strings, adapter, ... (see
                :class:`GenerationOptions`; default: all defaults).
            **overrides: :class:`GenerationOptions` fields replacing those of ``options``, e.g.
                ``llm.generate(p, max_new_tokens=64, temperature=0.7)``; an unknown name is a ConfigError.
        """
        result = None
        for ev in self.stream_events(prompt, options, **overrides):
            result = ev.result or result
        assert result is not None  # stream_events always ends with a result
        return result

    def stream(self, prompt: str | list[dict[str, str]], options: GenerationOptions | None = None, /,
               **overrides: Any) -> Iterator[str]:
        """Yield text pieces as they are decided (same arguments as :meth:`generate`)."""
        for ev in self.stream_events(prompt, options, **overrides):
            if ev.text:
                yield ev.text

    @property
    def info(self) -> dict[str, Any]:
        m = self.manifest
        return {
            "bundle": str(self.bundle),
            "target": {"architecture": m.target.architecture, "quantization": m.target.quantization,
                       "provider": self.providers["target"]},
            "draft": None if m.draft is None else {"architecture": m.draft.architecture,
                                                   "quantization": m.draft.quantization,
                                                   "provider": self.providers["draft"]},
            "max_context": m.target.max_context,
            "adapters": sorted(self.adapters),
        }


class _Bound:
    """A :class:`DecoderSession` seen by the decoding loop (adds ``max_context``)."""

    def __init__(self, session, entry: ModelEntry) -> None:
        self.session, self.max_context, self._entry = session, entry.max_context, entry

    @property
    def length(self) -> int:
        return self.session.length

    def forward(self, token_ids, num_logits: int = 1):
        return self.session.forward(token_ids, num_logits)

    @property
    def pass_seconds(self) -> float | None:
        return getattr(self.session, "pass_seconds", None)

    def rollback(self, length: int) -> None:
        self.session.rollback(length)

    def fork(self) -> _Bound:
        return _Bound(self.session.fork(), self._entry)

    def cached_ids(self):
        return self.session.cached_ids()


class Slot(NamedTuple):
    """One sequence's caches: the target's and the draft's (``None`` without a draft)."""

    target: _Bound
    draft: _Bound | None




class Adapter(NamedTuple):
    """A loaded LoRA adapter: its branch matrices for the target, and for the draft if it has a
    draft adapter (``None``: the draft computes as the base's); see :mod:`edgellm.lora`."""

    target: dict[str, Any]
    draft: dict[str, Any] | None


def _adapters(bundle: Path, manifest: Manifest) -> dict[str, Adapter]:
    """Every LoRA adapter of the bundle, loaded."""
    from edgellm.lora import load_adapter

    def load(role: str, rel: str | None) -> dict[str, Any] | None:
        lora = manifest.models[role].lora if role in manifest.models else None
        return None if rel is None or lora is None else load_adapter(bundle / rel, lora["sites"], lora["dtype"])

    return {name: Adapter(load("target", a["target"]), load("draft", a.get("draft")))
            for name, a in manifest.adapters.items()}


def _live_prefix(session, prompt: np.ndarray, adapter: str | None) -> int:
    """Tokens of ``prompt`` (int64 ``(n,)``) a session's live cache holds and may serve: none when the
    cache was computed with another adapter."""
    return common_prefix(session.cached_ids(), prompt) if session.adapter == adapter else 0


def _bind_adapter(target: _Bound, draft: _Bound | None, name: str | None, adapter: Adapter | None) -> None:
    """Make ``target`` (and ``draft``, when the adapter has a draft part) compute with adapter ``name``."""
    target.session.set_adapter(name, adapter.target if adapter else None)
    if draft is not None:
        with_draft = adapter is not None and adapter.draft is not None
        draft.session.set_adapter(name if with_draft else None, adapter.draft if with_draft else None)


def _session(bundle: Path, entry: ModelEntry, graph_format: str, provider, threads: int | None, min_rows: int = 1,
             open_graph: bool = True):
    """The session for one model: dynamic graphs (cpu export), static window graphs (npu export) or
    generic graphs (optimum export, separate past and present)."""
    from edgellm.runtimes.graphs import matmul_row_multiple
    from edgellm.runtimes.session import ConcatCacheSession, DecoderSession
    from edgellm.runtimes.static_session import StaticDecoderSession

    path = bundle / _graph(entry, graph_format)
    kv = entry.kv_layout
    if kv["kind"] == "static_window":
        step = entry.ort_step_graph if graph_format == "ort" else entry.step_graph
        return StaticDecoderSession.from_entry(path, entry.to_dict(), provider, threads,
                                               step_path=bundle / step if step else None)
    cls = ConcatCacheSession if kv["kind"] == "concat" else DecoderSession
    # the target (min_rows > 1) computes every row alike in any pass (see DecoderSession)
    return cls(path, _layout(entry), provider, threads, min_rows=min_rows, logits_tokens=_logits_tokens(bundle, entry),
               row_multiple=matmul_row_multiple(entry.quantization) if min_rows > 1 else 1, open_graph=open_graph)


def _logits_tokens(bundle: Path, entry: ModelEntry):
    """The token ids of a reduced draft LM head's columns (``draft_vocab``), or ``None``."""
    from edgellm.runtimes.graphs import read_token_ids

    if entry.draft_vocab is None:
        return None
    path = bundle / entry.draft_vocab["file"]
    ids = read_token_ids(path, entry.vocab_size)
    if len(ids) != entry.draft_vocab["size"]:
        raise BundleError(f"{path}: {len(ids)} token ids, the manifest says draft_vocab.size="
                          f"{entry.draft_vocab['size']} (the manifest was edited, or the bundle mixes two exports)")
    return ids


def _graph(entry: ModelEntry, graph_format: str) -> str:
    if graph_format not in GRAPH_FORMATS:
        raise ConfigError(f"graph_format={graph_format!r}; allowed: {', '.join(GRAPH_FORMATS)}")
    if graph_format == "ort":
        if entry.ort_graph is None:
            raise ConfigError(f"graph_format='ort', but this bundle's {entry.role} has no .ort graph; "
                              "re-export with --ort-mobile, or use graph_format='onnx'")
        return entry.ort_graph
    return entry.graph


def _layout(entry: ModelEntry):
    from edgellm.runtimes.session import KVLayout

    return KVLayout.from_entry(entry.to_dict())


def load(bundle: str | os.PathLike, *, provider: str = "cpu", draft_provider: str | None = None,
         threads: int | None = None, fallback: bool = False, verify: bool = True, graph_format: str = "onnx",
         prompt_cache_bytes: int = 0, shared_lookup_tokens: int = 0, max_batch: int = 1) -> LLM:
    """Load a bundle written by ``edgellm export``.

    Args:
        bundle: the bundle folder.
        provider: execution provider of the target (``cpu``, ``xnnpack``, ``coreml``, ``nnapi``,
            ``qnn``, ``dml``, ``webgpu``, ``openvino``, ``cuda``).
        draft_provider: provider of the draft (default: same as ``provider``).
        threads: intra-op threads per session (default: all cores; the sessions alternate).
        fallback: use the CPU with a warning when a provider is missing, instead of raising.
        verify: check the sha256 of every file against the manifest before loading.
        graph_format: ``onnx``, or ``ort`` for the ORT Mobile graphs of a bundle exported with
            ``--ort-mobile`` (what an app with a minimal onnxruntime loads).
        prompt_cache_bytes: memory for the caches of earlier conversations (:mod:`edgellm.prompt_cache`);
            0 keeps only the live caches, which a prompt continuing the last generation reuses anyway.
        shared_lookup_tokens: keep this many tokens of earlier prompts and outputs in an n-gram
            index that proposes for every later generation (:class:`edgellm.lookup.SharedLookup`); 0: off.
        max_batch: sequences that may be in flight at once, each in its own cache slot on the one
            loaded graph (``stream_events(..., slot=k)``); generations on several threads inside
            ``llm.gate.member()`` have their target passes batched (what the server does).

    Raises:
        BundleError: missing or damaged bundle (the message names each bad file).
        ManifestError: malformed manifest or unsupported ``format_version``.
        ProviderUnavailableError: the provider is not in this onnxruntime (and no fallback).
    """
    path = Path(bundle).expanduser()
    manifest = read_manifest(path)
    check_bundle(path, manifest, verify=verify)
    return LLM(path, manifest, provider=provider, draft_provider=draft_provider, threads=threads, fallback=fallback,
               graph_format=graph_format, prompt_cache_bytes=prompt_cache_bytes,
               shared_lookup_tokens=shared_lookup_tokens, max_batch=max_batch)
