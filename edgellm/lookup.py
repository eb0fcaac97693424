"""Draft-free proposals: prompt-lookup (n-gram) drafting.

The last few tokens of the sequence are searched for earlier in the sequence (the prompt and the
text generated so far); the tokens that followed the most recent earlier occurrence are proposed.
Pays off when the output repeats the input (code editing, summaries quoting their source).
"""

from __future__ import annotations

import threading

from typing import Iterator

import numpy as np

from edgellm.errors import ConfigError

#: tokens of earlier requests the server's shared index keeps (a few hundred bytes each)
DEFAULT_SHARED_LOOKUP = 100_000


def propose_lookup(seq: list[int] | np.ndarray, max_tokens: int, max_ngram: int = 4,
                   min_ngram: int = 2) -> list[int]:
    """Propose up to ``max_tokens`` continuation tokens of ``seq`` by n-gram matching.

    Tries the longest suffix first (``max_ngram`` tokens down to ``min_ngram``) and takes the
    most recent earlier match.

    Args:
        seq: the committed token ids so far.
        max_tokens: most tokens to propose.
        max_ngram: longest suffix to match.
        min_ngram: shortest suffix to match.

    Returns:
        The proposed token ids (possibly empty).
    """
    if max_tokens <= 0:
        return []
    a = np.asarray(seq, dtype=np.int64)
    n_total = len(a)
    for n in range(min(max_ngram, n_total - 1), min_ngram - 1, -1):
        suffix = a[n_total - n:]
        # windows starting at 0 .. n_total - n - 1 (exclude the suffix itself)
        windows = np.lib.stride_tricks.sliding_window_view(a[: n_total - 1], n)
        hits = np.nonzero((windows == suffix).all(axis=1))[0]
        if len(hits):
            start = int(hits[-1]) + n
            follow = a[start : start + max_tokens]
            if len(follow):
                return [int(t) for t in follow]
    return []


class SharedLookup:
    """An n-gram index over the token sequences a server has seen, proposing for every request.

    Prompt lookup (:func:`propose_lookup`) only searches the request's own tokens. Requests to
    one server often repeat each other (an agent asking for the same JSON tool-call shape, the
    same system prompt, code from an earlier answer), so this index keeps the last
    ``max_tokens`` tokens of prompts and outputs (the oldest sequences dropped first) and maps
    every n-gram (``min_ngram`` to ``max_ngram`` tokens) to where it occurred last — the
    "global tree" of SuffixDecoding (arXiv 2411.04975) reduced to its most recent continuation.
    Its proposals are verified like any other, so output is unchanged; the decoding loop tracks
    their acceptance apart from the request's own lookup (source ``shared``) and takes, each
    round, the source it expects more tokens from.

    Thread-safe: the server's generations (one thread each) propose and add concurrently.
    """

    def __init__(self, max_tokens: int, max_ngram: int = 4, min_ngram: int = 2) -> None:
        if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 0:
            raise ConfigError(f"shared_lookup_tokens={max_tokens!r}; allowed: an integer >= 0 (0 turns it off)",
                              param="shared_lookup_tokens")
        self.max_tokens, self.max_ngram, self.min_ngram = max_tokens, max_ngram, min_ngram
        self._seqs: dict[int, np.ndarray] = {}  # insertion order: oldest first
        self._index: dict[tuple[int, ...], tuple[int, int]] = {}  # n-gram -> (sequence, end position)
        self._next = 0
        self.tokens = 0
        self._lock = threading.Lock()

    def add(self, seq: list[int] | np.ndarray) -> None:
        """Index ``seq`` (a prompt plus its output), dropping the oldest sequences past ``max_tokens``."""
        if not self.max_tokens:
            return
        a = np.asarray(seq, np.int64)[-self.max_tokens:]
        if len(a) <= self.min_ngram:
            return
        with self._lock:
            key, self._next = self._next, self._next + 1
            self._seqs[key] = a
            self.tokens += len(a)
            for gram, end in self._ngrams(a.tolist()):
                self._index[gram] = (key, end)
            while self.tokens > self.max_tokens:
                self._drop(next(iter(self._seqs)))

    def _drop(self, key: int) -> None:
        items = self._seqs.pop(key).tolist()
        self.tokens -= len(items)
        for gram, _ in self._ngrams(items):
            if self._index.get(gram, (None,))[0] == key:
                del self._index[gram]

    def _ngrams(self, items: list[int]) -> Iterator[tuple[tuple[int, ...], int]]:
        """Each indexed n-gram of ``items`` with the position after it; only n-grams something follows."""
        for n in range(self.min_ngram, self.max_ngram + 1):
            for end in range(n, len(items)):
                yield tuple(items[end - n:end]), end

    def propose(self, seq: list[int] | np.ndarray, max_tokens: int) -> list[int]:
        """Up to ``max_tokens`` tokens that followed the longest suffix of ``seq`` seen before."""
        if max_tokens <= 0 or not self._index:
            return []
        tail = [int(t) for t in seq[-self.max_ngram:]]
        with self._lock:
            for n in range(min(self.max_ngram, len(tail)), self.min_ngram - 1, -1):
                hit = self._index.get(tuple(tail[len(tail) - n:]))
                if hit is not None:
                    key, end = hit
                    return [int(t) for t in self._seqs[key][end:end + max_tokens]]
        return []
