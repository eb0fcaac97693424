"""Draft-free proposals: prompt-lookup (n-gram) drafting.

The last few tokens of the sequence are searched for earlier in the sequence (the prompt and the
text generated so far); the tokens that followed the most recent earlier occurrence are proposed.
Pays off when the output repeats the input (code editing, summaries quoting their source).
"""

from __future__ import annotations

import numpy as np


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
