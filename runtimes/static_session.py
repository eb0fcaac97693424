"""A static-shape decoder graph (``--target-device npu``) with a KV cache kept by the runtime.

The graph (see ``edgellm/export/static_builder.py``) always takes ``window`` tokens and a cache
of ``cache_length`` slots (``max_context`` plus a window of slack for padding rows), writes the
new keys and values into its slots by position before attending, and returns them; this class
keeps them in its cache at the current position, so rolling back is moving the position.
Shorter inputs are padded (the padding's logits and cache entries are dropped); longer ones (a
prompt) run in windows. The attention mask lets the token at position t see slots 0..t; masked
scores get zero weight, and every token attends the same slots in the same order however the
tokens before it arrived, so speculative output equals target-mode output bit for bit.

A draft may also have a one-token *step* graph (same weights, ``window`` 1): single tokens,
which is how a draft proposes, then run there instead of in a padded window. The target never
gets one: a token computed by a different graph could round differently, and the target must
compute every position the same way whether it decodes alone or verifies a draft.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from edgellm.errors import ContextLengthError
from edgellm.runtimes.graphs import check_graph, open_session
from edgellm.runtimes.providers import ProviderChoice
from edgellm.runtimes.rotary import cos_sin, inv_freq
from edgellm.runtimes.session import CachedSession, KVLayout



class StaticDecoderSession(CachedSession):
    """Same interface as :class:`~edgellm.runtimes.session.DecoderSession` (forward, rollback, length)."""

    def __init__(self, model_path: Path, layout: KVLayout, provider: ProviderChoice, threads: int | None,
                 window: int, rope_theta: float, num_heads: int, step_path: Path | None = None,
                 cache_length: int | None = None) -> None:
        self.layout, self.window, self.rope_theta = layout, window, rope_theta
        self.cache_length = cache_length or layout.max_context + window  # slots, padding rows included
        self.groups = num_heads // layout.num_kv_heads
        self.session, self.load_seconds = open_session(model_path, provider, threads)
        self._check(self.session, model_path, window)
        self.providers = self.session.get_providers()
        self.step_session = None
        if step_path is not None:
            self.step_session, seconds = open_session(step_path, provider, threads)
            self._check(self.step_session, step_path, 1)
            self.load_seconds += seconds
        shape = (1, layout.num_kv_heads, self.cache_length, layout.head_dim)
        self._cache = [np.zeros(shape, np.float32) for _ in range(2 * layout.num_layers)]
        self.length = 0

    def _check(self, session, path: Path, window: int) -> None:
        """The graph's shapes against the manifest's (see :func:`check_graph`), window and heads included."""
        half, lay = self.layout.head_dim // 2, self.layout
        check_graph(session, lay, self.cache_length, path,
                    {"input_ids": [window], "cos": [window, half], "sin": [window, half],
                     "attention_mask": [self.groups * window, self.cache_length]})

    @classmethod
    def from_entry(cls, graph: Path, entry: dict, provider: ProviderChoice, threads: int | None = None,
                   step_path: Path | None = None) -> StaticDecoderSession:
        """A session for ``graph`` as the manifest model ``entry`` (a dict) describes it."""
        kv = entry["kv_layout"]
        return cls(graph, KVLayout.from_entry(entry), provider, threads, int(kv["window"]), float(kv["rope_theta"]),
                   entry["num_heads"], step_path=step_path, cache_length=int(kv["cache_length"]))

    def forward(self, token_ids: np.ndarray, num_logits: int = 1) -> np.ndarray:
        """Append ``token_ids`` ``(S,)`` and return logits ``(num_logits, V)`` of the last positions."""
        ids = np.asarray(token_ids, np.int64).reshape(-1)
        if self.length + len(ids) > self.layout.max_context:
            raise ContextLengthError(
                f"{self.length + len(ids)} tokens do not fit this bundle's max_context={self.layout.max_context}"
            )
        if len(ids) == 1 and self.step_session is not None:
            return self._window(ids, self.step_session, 1)
        out = [self._window(ids[i : i + self.window], self.session, self.window)
               for i in range(0, len(ids), self.window)]
        return np.concatenate(out)[-num_logits:]

    def _window(self, ids: np.ndarray, session, window: int) -> np.ndarray:
        n, p, lay = len(ids), self.length, self.layout
        feeds = self.window_feeds(ids, window)
        io = lay.io
        names = [io["logits"]] + [io[k] % i for i in range(lay.num_layers) for k in ("present_key", "present_value")]
        logits, *present = self._run(session, names, feeds)
        for j, new in enumerate(present):
            self._cache[j][:, :, p : p + n] = new[:, :, :n]
        self.length = p + n
        return logits[0, :n]

    def _run(self, session, names: list[str], feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
        return session.run(names, feeds)

    def window_feeds(self, ids: np.ndarray, window: int | None = None) -> dict[str, np.ndarray]:
        """The inputs of a graph of ``window`` tokens (default: the window graph's) for ``ids`` (padded)."""
        n, S, p, lay = len(ids), window or self.window, self.length, self.layout
        padded = np.concatenate([ids, np.repeat(ids[-1:], S - n)])[None]
        cos, sin = cos_sin(np.arange(p, p + S), inv_freq(lay.head_dim, self.rope_theta))
        # row r (position p + r) attends slots 0 .. p + r; 1 = masked (the graph scales it per layer)
        mask = (np.arange(self.cache_length)[None, :] > np.arange(p, p + S)[:, None]).astype(np.float32)
        feeds = {"input_ids": padded, "cos": cos[None].astype(np.float32), "sin": sin[None].astype(np.float32),
                 "write_positions": np.arange(p, p + S, dtype=np.int64).reshape(1, 1, S, 1),
                 "attention_mask": np.tile(mask, (self.groups, 1))[None, None]}
        io = lay.io
        for i in range(lay.num_layers):
            feeds[io["past_key"] % i], feeds[io["past_value"] % i] = self._cache[2 * i], self._cache[2 * i + 1]
        return feeds

    def _cache_buffer(self, index: int) -> np.ndarray:
        return self._cache[index]
