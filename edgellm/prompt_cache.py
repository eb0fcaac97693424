"""Prompt caching: reuse the cached prefix a new prompt shares with an earlier one.

Two levels:

* the *live* caches: a session's KV buffers still hold the last generation's prompt and output,
  so :func:`edgellm.speculative.decode` keeps the longest common prefix of the new prompt and
  what is cached (:func:`common_prefix`) and prefills only the rest;
* :class:`PromptCache`: copies of other conversations' caches (target and draft), least recently
  used first out, bounded in bytes. When a new prompt shares more with a stored copy than with
  the live caches, the live caches are stored and the copy takes their place
  (:meth:`edgellm.api.LLM` does this before each generation).

A cached position's keys and values are the ones a cold prefill computes (every pass of two or
more rows computes a row alike; see :class:`edgellm.runtimes.session.DecoderSession`), so output
with a cache hit is the output of a cold run (tested).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

from edgellm.errors import ConfigError

#: the server's memory for other conversations' caches: about 6,000 tokens of the reference
#: pair (82 KB a token: 57 KB the 1.5B target's fp32 keys and values, 25 KB the 0.5B draft's)
DEFAULT_PROMPT_CACHE = "512M"


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    """How many leading tokens ``a`` and ``b`` (int64 ``(n,)``, ``(m,)``) share."""
    n = min(len(a), len(b))
    differ = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(differ[0]) if len(differ) else n


@dataclass(frozen=True)
class Snapshot:
    """One session's cached positions, copied out of its buffers.

    Attributes:
        ids: int64 ``(n,)``, the cached tokens.
        arrays: per cache buffer (layer-major, key then value), ``(kv_heads, n, head_dim)``.
    """

    ids: np.ndarray
    arrays: tuple[np.ndarray, ...]

    @property
    def nbytes(self) -> int:
        return int(self.ids.nbytes + sum(a.nbytes for a in self.arrays))


@dataclass(frozen=True)
class Entry:
    """A stored conversation: the target's snapshot and the draft's (``None`` without a draft), and
    the LoRA adapter the target computed it with (``None``: the base; only a prompt for the same
    adapter may reuse it)."""

    target: Snapshot
    draft: Snapshot | None
    adapter: str | None = None

    @property
    def nbytes(self) -> int:
        return self.target.nbytes + (self.draft.nbytes if self.draft is not None else 0)


class PromptCache:
    """An LRU of :class:`Entry`, at most ``max_bytes`` in all (0 stores nothing).

    Not thread-safe: one thread uses it (the server's worker thread, whatever its number of slots).
    """

    def __init__(self, max_bytes: int) -> None:
        if not isinstance(max_bytes, int) or isinstance(max_bytes, bool) or max_bytes < 0:
            raise ConfigError(f"prompt_cache_bytes={max_bytes!r}; allowed: an integer >= 0 (0 keeps only the "
                              "live caches)", param="prompt_cache_bytes")
        self.max_bytes = max_bytes
        self._entries: OrderedDict[int, Entry] = OrderedDict()
        self._next = 0
        self.evictions = 0

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self._entries.values())

    def __len__(self) -> int:
        return len(self._entries)

    def store(self, entry: Entry) -> bool:
        """Add ``entry`` as the most recent, evicting the least recent ones until all fit.

        Entries whose tokens are a prefix of the new entry's (an earlier turn of the same
        conversation) are dropped: the new entry serves every prompt they served.

        Returns:
            False when the entry alone is larger than ``max_bytes`` (not stored).
        """
        if entry.nbytes > self.max_bytes or not len(entry.target.ids):
            return False
        ids = entry.target.ids
        for key in [k for k, e in self._entries.items()  # an earlier turn of the same conversation
                    if e.adapter == entry.adapter and common_prefix(e.target.ids, ids) == len(e.target.ids)]:
            del self._entries[key]
        self._entries[self._next] = entry
        self._next += 1
        while self.nbytes > self.max_bytes:
            self._entries.popitem(last=False)
            self.evictions += 1
        return True

    def take_best(self, prompt: np.ndarray, better_than: int, adapter: str | None = None) -> Entry | None:
        """Remove and return the entry of ``adapter`` sharing the longest prefix with ``prompt`` (int64
        ``(n,)``), when that prefix is longer than ``better_than`` tokens; else ``None`` (nothing changes)."""
        best, best_n = None, better_than
        for key, entry in self._entries.items():
            n = common_prefix(entry.target.ids, prompt) if entry.adapter == adapter else 0
            if n > best_n:
                best, best_n = key, n
        return None if best is None else self._entries.pop(best)


def parse_bytes(text: str | int) -> int:
    """``512M``, ``2G``, ``1048576`` -> bytes (binary multiples: K = 1024).

    Raises:
        ConfigError: naming the value and the accepted forms.
    """
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        s = str(text).strip().upper().removesuffix("IB").removesuffix("B")
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(s[-1:], 1)
        digits = s[:-1] if scale > 1 else s
        value = int(float(digits) * scale) if digits.replace(".", "", 1).isdigit() else -1
    if value < 0:
        raise ConfigError(f"prompt cache size {text!r}; allowed: a byte count such as 536870912, 512M or 2G "
                          "(0 keeps only the live caches)", param="prompt_cache_bytes")
    return value
