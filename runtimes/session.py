"""One decoder graph in an onnxruntime session, with a preallocated KV cache bound in place.

The cache is a static buffer ``(1, kv_heads, max_context, head_dim)`` per layer and per K/V,
bound with IO binding as both the ``past`` input and the ``present`` output of the graph, so
onnxruntime's GroupQueryAttention writes the new keys at ``[length, length + S)`` and nothing is
copied between steps. The cache length is just an integer: rolling back is setting it lower
(the stale rows past it are ignored by the next call and overwritten by it).
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import ConfigError, ContextLengthError, RollbackError
from edgellm.prompt_cache import Snapshot
from edgellm.runtimes.graphs import attention_boundaries, check_graph, expand_logits, open_session
from edgellm.runtimes.providers import ProviderChoice

logger = logging.getLogger(__name__)


@dataclass
class KVLayout:
    """What the manifest says about one model's cache and IO (see ``edgellm/manifest.py``)."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    max_context: int
    vocab_size: int
    io: dict[str, Any]
    dtype: str = "float32"  # of the cache: float16 in gpu bundles
    lora: dict[str, Any] | None = None  # the graph's LoRA branches: {"sites": {tag: [in, out]}, "dtype": ...}

    @classmethod
    def from_entry(cls, entry: dict[str, Any]) -> KVLayout:
        """The layout of a manifest model entry (``ModelEntry.to_dict()`` or the exporter's dict)."""
        return cls(entry["num_layers"], entry["num_kv_heads"], entry["head_dim"], entry["max_context"],
                   entry["vocab_size"], entry["io"], entry["kv_layout"].get("dtype", "float32"), entry.get("lora"))


class CachedSession:
    """What every session shares: a cache of ``length`` positions, rolled back by moving ``length``."""

    length: int

    def rollback(self, length: int) -> None:
        """Keep only the first ``length`` cached positions. O(1); idempotent.

        Raises:
            RollbackError: ``length`` is negative or beyond what is cached.
        """
        if not 0 <= length <= self.length:
            raise RollbackError(f"cannot roll back to length {length}: the cache holds {self.length} positions")
        self.length = length

    def reset(self) -> None:
        self.length = 0

    #: the LoRA adapter its graph computes with (``None``: the base model); see DecoderSession.set_adapter
    adapter: str | None = None

    def set_adapter(self, name: str | None, values: dict[str, Any] | None = None) -> None:
        if name is not None:
            raise ConfigError(f"adapter={name!r}, but this graph has no LoRA branches", param="adapter")

    #: whether the session keeps the ids of its cached tokens, so that a new prompt can reuse the
    #: prefix it shares with them (:mod:`edgellm.prompt_cache`)
    reuses_prefix = False

    def cached_ids(self) -> np.ndarray:
        """int64 ``(length,)``: the tokens whose keys and values are cached (empty if not tracked)."""
        return np.zeros(0, np.int64)

    def cache_array(self, layer: int, kind: str = "key") -> np.ndarray:
        """A copy of one layer's cache ``(kv_heads, length, head_dim)`` (for tests)."""
        return self._cache_buffer(2 * layer + (kind == "value"))[0, :, : self.length].copy()

    def _cache_buffer(self, index: int) -> np.ndarray:
        raise NotImplementedError


class DecoderSession(CachedSession):
    """A decoder graph plus its KV cache: ``forward`` appends tokens, ``rollback`` forgets them.

    Invariant: ``self.length`` is the number of positions whose keys and values are in the cache.

    ``logits_tokens`` (int64 ``(k,)``): the graph's logits cover only these token ids (a draft
    with a reduced LM head, see :mod:`edgellm.export.draft_vocab`); ``forward`` still returns
    logits over the whole vocabulary, ``-inf`` for the other tokens.

    ``min_rows=2`` makes every pass at least two tokens long (a single token is followed by a
    copy of itself, whose logits and cache entry are dropped). onnxruntime computes a one-row
    pass with other kernels than a k-row pass (attention, and MatMulNBits at accuracy level 4:
    0.3-0.5 logits apart on the real pair), while passes of two or more rows give every row
    bit-identical results. A target that decodes alone and one that verifies drafts then compute
    every position the same way, so greedy speculative output equals target-mode output even
    where two tokens nearly tie. It costs 6-10 % of a one-token step, which is why the decoding
    loop fills that row with a lookup proposal when it has one (``speculative._plan_round``).
    ``row_multiple`` (:func:`matmul_row_multiple`) pads every pass to an even number of rows
    where the weights' kernels compute rows in pairs. Heads wider than 128 add one rule
    (:func:`attention_boundaries`): a pass never holds rows on both sides of a boundary; it is
    split there, and a lone row just below one is padded with the row before it instead of a copy
    after it.
    """

    def __init__(self, model_path: Path, layout: KVLayout, provider: ProviderChoice,
                 threads: int | None = None, min_rows: int = 1, profile_prefix: str | None = None,
                 logits_tokens: np.ndarray | None = None, row_multiple: int = 1, open_graph: bool = True) -> None:
        import onnxruntime as ort

        self.layout, self.min_rows, self.logits_tokens = layout, min_rows, logits_tokens
        self.row_multiple = row_multiple  # see matmul_row_multiple
        self.session, self.load_seconds, self.providers = None, 0.0, []
        if open_graph:  # else its passes go through a gate's batch graph only (see api.LLM)
            self.session, self.load_seconds = open_session(model_path, provider, threads, profile_prefix)
            check_graph(self.session, layout, layout.max_context, model_path,
                        logits_width=None if logits_tokens is None else len(logits_tokens))
            self.providers = self.session.get_providers()
        self._ort = ort
        self.length = 0
        self._ids = np.zeros(layout.max_context, np.int64)  # the cached positions' tokens
        self.boundaries = attention_boundaries(layout.head_dim, provider)
        sites = (layout.lora or {}).get("sites", {})
        dtype = np.dtype((layout.lora or {}).get("dtype", "float32"))
        # rank-0 branch matrices: the branch adds exactly 0 (the base model, or a site an adapter skips)
        self._no_lora = {f"{t}.{k}": ort.OrtValue.ortvalue_from_numpy(np.zeros((i, 0) if k == "a" else (0, o), dtype))
                         for t, (i, o) in sites.items() for k in "ab"}
        self._bind_cache()

    def fork(self) -> DecoderSession:
        """Another cache on the same loaded graph: its own buffers and length, no second copy of the weights.

        What lets one process keep several sequences in flight (the server's slots, ``max_batch``):
        each has its own cache, and their passes take turns on the one onnxruntime session.
        """
        twin = copy.copy(self)
        twin.length, twin._ids = 0, np.zeros(self.layout.max_context, np.int64)
        twin._bind_cache()
        return twin

    def _bind_cache(self) -> None:
        lay, io = self.layout, self.layout.io
        shape = (1, lay.num_kv_heads, lay.max_context, lay.head_dim)
        self.binding = self.session.io_binding() if self.session is not None else None
        if self.binding is not None:
            self.binding.bind_output(io["logits"], "cpu")  # bound first: get_outputs()[0]
        self._cache = []
        for i in range(lay.num_layers):
            for past, present in (("past_key", "present_key"), ("past_value", "present_value")):
                buf = self._ort.OrtValue.ortvalue_from_numpy(np.zeros(shape, np.dtype(lay.dtype)))
                self._cache.append(buf)
                if self.binding is not None:
                    self.binding.bind_ortvalue_input(io[past] % i, buf)
                    self.binding.bind_ortvalue_output(io[present] % i, buf)
        self.adapter: str | None = None
        self._bind_lora({})

    def _bind_lora(self, values: dict[str, Any]) -> None:
        self._lora = {f"lora.{key}": values.get(key, zero) for key, zero in self._no_lora.items()}
        if self.binding is not None:
            for name, value in self._lora.items():
                self.binding.bind_ortvalue_input(name, value)

    def lora_values(self) -> dict[str, Any]:
        """The LoRA branch inputs this session computes with, by graph input name (OrtValues)."""
        return self._lora

    def set_adapter(self, name: str | None, values: dict[str, Any] | None = None) -> None:
        """Compute with LoRA adapter ``name`` from now on (``None``: the base model).

        Args:
            name: the adapter's name; the cache is emptied when it changes (its keys and values
                were computed with the other weights).
            values: OrtValues by ``<site>.a`` / ``<site>.b`` (:func:`edgellm.lora.load_adapter`);
                sites left out get no branch.
        """
        if name == self.adapter:
            return
        if name is not None and not self._no_lora:
            raise ConfigError(f"adapter={name!r}, but this graph has no LoRA branches", param="adapter")
        self._bind_lora(values or {})
        self.adapter, self.length = name, 0

    def forward(self, token_ids: np.ndarray, num_logits: int = 1) -> np.ndarray:
        """Append ``token_ids`` to the cache and return logits of the last ``num_logits`` positions.

        Args:
            token_ids: int64 ``(S,)``, S >= 1.
            num_logits: how many trailing positions to return logits for (1 <= num_logits <= S).

        Returns:
            float32 ``(num_logits, vocab_size)``.
        """
        self.pass_seconds = 0.0
        logits = self._forward(token_ids, num_logits)
        if self.logits_tokens is not None:
            return expand_logits(logits, self.logits_tokens, self.layout.vocab_size)
        return logits

    def _forward(self, token_ids: np.ndarray, num_logits: int) -> np.ndarray:
        s = len(token_ids)
        total = self.length + s
        if total > self.layout.max_context:
            raise ContextLengthError(
                f"{total} tokens do not fit this bundle's max_context={self.layout.max_context}; "
                "shorten the prompt, lower max_new_tokens, or re-export with a larger --max-context"
            )
        ids = np.asarray(token_ids, np.int64).reshape(-1)
        cut = next((b for b in self.boundaries if self.length < b < total), None)
        if cut is not None:  # rows on both sides of a boundary never share a pass (see attention_boundaries)
            k = cut - self.length
            first = self._forward(ids[:k], max(1, num_logits - (s - k)))
            rest = self._forward(ids[k:], min(num_logits, s - k))
            return np.concatenate([first[len(first) - max(0, num_logits - (s - k)):], rest])
        self._ids[self.length:total] = ids
        rows = max(s, self.min_rows)
        rows += -rows % self.row_multiple
        pad = rows - s if total + rows - s <= self.layout.max_context else 0
        after = 0  # copies after the real rows, whose logits are dropped
        if pad > 0 and total in self.boundaries and self.length >= pad:
            # a copy after the last row would cross the boundary: run the rows before it again
            # instead (same tokens at the same positions: their cache entries come out the same)
            self.length -= pad
            run = self._ids[self.length:total]
        elif pad > 0:  # see the class docstring: the copies' logits and cache entries are dropped
            run, after = np.concatenate([ids, np.repeat(ids[-1:], pad)]), pad
        else:
            run = ids
        # the LM head too computes rows alike only in passes of min_rows or more, in whole row pairs
        want = max(num_logits + after, self.min_rows)
        want = min(len(run), want + -want % self.row_multiple)
        logits = self._run(run, want)
        self.length = total
        return logits[want - after - num_logits: want - after]

    binding = None  # the session's own IO binding (None once its passes go through a batch graph)
    _lora: dict[str, Any] = {}

    #: a :class:`edgellm.runtimes.batched.PassGate` this session's passes go through (set by the
    #: runtime when several sequences share the loaded graph); ``None``: each pass runs alone
    gate = None

    #: seconds the last :meth:`forward` cost this sequence: its passes' time, or with a gate its
    #: share of the batched calls (by rows), not the time it waited for the others
    pass_seconds = 0.0

    def _run(self, token_ids: np.ndarray, num_logits: int) -> np.ndarray:
        if self.gate is not None:
            part = self.gate.submit(self, token_ids, num_logits)
            self.pass_seconds += part.seconds
            return part.logits
        t0 = time.perf_counter()
        logits = self._run_alone(token_ids, num_logits)
        self.pass_seconds += time.perf_counter() - t0
        return logits

    def _run_alone(self, token_ids: np.ndarray, num_logits: int) -> np.ndarray:
        s, total = len(token_ids), self.length + len(token_ids)
        io, b = self.layout.io, self.binding
        b.bind_cpu_input(io["input_ids"], token_ids.reshape(1, s))
        b.bind_cpu_input(io["num_logits"], np.array([num_logits], np.int64))
        b.bind_cpu_input(io["seqlens_k"], np.array([total - 1], np.int32))
        b.bind_cpu_input(io["total_sequence_length"], np.array(total, np.int32))
        b.bind_output(io["logits"], "cpu")  # its shape changes with num_logits: let ORT allocate
        self.session.run_with_iobinding(b)
        return b.get_outputs()[0].numpy()[0]

    reuses_prefix = True

    def cached_ids(self) -> np.ndarray:
        return self._ids[: self.length]

    def snapshot(self) -> Snapshot:
        """A copy of the cached positions (tokens, keys and values) for :class:`edgellm.prompt_cache.PromptCache`."""
        n = self.length
        return Snapshot(self._ids[:n].copy(),
                        tuple(self._cache_buffer(i)[0, :, :n].copy() for i in range(2 * self.layout.num_layers)))

    def restore(self, snap: Snapshot) -> None:
        """Make ``snap`` the cached positions (the inverse of :meth:`snapshot`).

        Raises:
            RollbackError: the snapshot does not fit this session's buffers.
        """
        n, lay = len(snap.ids), self.layout
        if n > lay.max_context or len(snap.arrays) != 2 * lay.num_layers or any(
                a.shape != (lay.num_kv_heads, n, lay.head_dim) for a in snap.arrays):
            raise RollbackError(f"a cached prompt of {n} tokens does not fit this session's cache")
        for i, a in enumerate(snap.arrays):
            self._cache_buffer(i)[0, :, :n] = a
        self._ids[:n] = snap.ids
        self.length = n

    def _cache_buffer(self, index: int) -> np.ndarray:
        return self._cache[index].numpy()  # a view: OrtValues made from numpy arrays share their memory


class ConcatCacheSession(DecoderSession):
    """A generic (optimum) graph: past and present keys/values are separate tensors.

    The graph returns ``present = concat(past, new)``; the session keeps the cache in its own
    buffer ``(1, kv_heads, max_context, head_dim)`` per layer and K/V, hands the first ``length``
    positions in as the past and copies the new rows back, so rolling back is still setting
    ``length``. Each call copies the cache (what makes this path slower than a native graph);
    padding and boundaries are :class:`DecoderSession`'s, so speculative output stays exact.
    """

    def _bind_cache(self) -> None:
        lay = self.layout
        shape = (1, lay.num_kv_heads, lay.max_context, lay.head_dim)
        self._cache = [np.zeros(shape, np.dtype(lay.dtype)) for _ in range(2 * lay.num_layers)]
        self._names = [(lay.io[past] % i, lay.io[present] % i) for i in range(lay.num_layers)
                       for past, present in (("past_key", "present_key"), ("past_value", "present_value"))]

    def _run_alone(self, token_ids: np.ndarray, num_logits: int) -> np.ndarray:
        start, s = self.length, len(token_ids)
        io = self.layout.io
        feed = {io["input_ids"]: token_ids.reshape(1, s), io["attention_mask"]: np.ones((1, start + s), np.int64)}
        if io.get("position_ids"):
            feed[io["position_ids"]] = np.arange(start, start + s, dtype=np.int64)[None]
        for (past, _), buf in zip(self._names, self._cache):
            feed[past] = buf[:, :, :start]
        out = self.session.run([io["logits"]] + [present for _, present in self._names], feed)
        for buf, present in zip(self._cache, out[1:]):
            buf[:, :, start:start + s] = present[:, :, start:]
        return out[0][0, s - num_logits:]

    def _cache_buffer(self, index: int) -> np.ndarray:
        return self._cache[index]
