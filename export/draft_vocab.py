"""The draft's vocabulary: its LM head keeps only the most frequent tokens (FR-Spec, arXiv 2502.14856).

A draft model's LM head is a large part of what it reads per token (151936 x 896 of the 0.5B
Qwen2.5's ~494M weights: ~27%), yet a proposal is almost always a frequent token. The exporter
keeps the head's rows of the ``size`` most frequent tokens (counted over a corpus, ties and
tokens the corpus never shows broken by token id: byte-pair merges come in frequency order),
plus every special token, and stores their ids in the bundle. The runtime gives the other
tokens probability zero.

Exactness is untouched: the target verifies every proposal, and rejection sampling with a draft
distribution ``q`` that is zero outside the subset still yields exactly the target's distribution
(Leviathan et al., Theorem 1 holds for any q). Only acceptance can drop, where the target picks a
token the draft cannot propose.

The default corpus is the Python standard library's source (present wherever the exporter
runs: code, comments and docstrings in English), capped at :data:`CORPUS_CHARS`; ``--draft-vocab-
corpus FILE`` counts over your own text instead (a language, a code base).
"""

from __future__ import annotations

import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import numpy as np

from edgellm.errors import ConfigError
from edgellm.options import DEFAULT_DRAFT_VOCAB as DEFAULT_SIZE

CORPUS_CHARS = 8_000_000
FILE_NAME = "vocab.i32"  # little-endian int32 token ids, ascending: column j of the logits is token ids[j]


def stdlib_corpus(limit_chars: int = CORPUS_CHARS) -> tuple[list[str], str]:
    """The Python standard library's ``.py`` files (tests left out), in path order, up to ``limit_chars``.

    Returns:
        The texts, and a description of the corpus for the manifest.
    """
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, size = [], 0
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).parts
        if any(p in ("test", "tests", "idlelib", "site-packages") for p in rel):
            continue
        try:
            text = f.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        texts.append(text[: limit_chars - size])
        size += len(texts[-1])
        if size >= limit_chars:
            break
    return texts, f"python {sysconfig.get_python_version()} standard library, {size} characters"


def token_counts(tokenizer, texts: Iterable[str], vocab_size: int) -> np.ndarray:
    """How often each token id occurs in ``texts`` -> int64 ``(vocab_size,)``.

    Args:
        tokenizer: a ``tokenizers.Tokenizer``.
    """
    counts = np.zeros(vocab_size, np.int64)
    for enc in tokenizer.encode_batch(list(texts), add_special_tokens=False):
        ids = np.asarray(enc.ids, np.int64)
        np.add.at(counts, ids[ids < vocab_size], 1)
    return counts


def frequent_tokens(counts: np.ndarray, size: int, always: Iterable[int] = ()) -> np.ndarray:
    """The ``size`` most frequent token ids plus ``always`` (special tokens), ascending int32.

    Ties, and tokens never counted, go by token id (lower first). ``always`` ids are added on top
    of ``size``, so the result may hold a few more.
    """
    order = np.lexsort((np.arange(len(counts)), -counts))
    keep = np.zeros(len(counts), bool)
    keep[order[:size]] = True
    keep[[i for i in always if 0 <= i < len(counts)]] = True
    return np.flatnonzero(keep).astype(np.int32)


def write_ids(path: Path, ids: np.ndarray) -> None:
    """Store token ids as little-endian int32 ``(n,)``.

    The runtime reads them with :func:`edgellm.runtimes.session.read_token_ids`.
    """
    path.write_bytes(np.asarray(ids, "<i4").tobytes())




@dataclass(frozen=True)
class DraftVocabConfig:
    """How many tokens the draft's LM head keeps, counted over which corpus.

    Attributes:
        size: tokens kept (special tokens come on top); 0 keeps the whole vocabulary.
        corpus: a UTF-8 text file to count over, or ``None`` for :func:`stdlib_corpus`.
    """

    size: int = DEFAULT_SIZE
    corpus: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.size, int) or isinstance(self.size, bool) or self.size < 0:
            raise ConfigError(f"draft_vocab={self.size!r}; allowed: 0 (the whole vocabulary) or a positive integer",
                              param="draft_vocab")
        if self.corpus is not None and not Path(self.corpus).expanduser().is_file():
            raise ConfigError(f"draft_vocab_corpus={str(self.corpus)!r} is not a file; allowed: a UTF-8 text file",
                              param="draft_vocab_corpus")

    def texts(self) -> tuple[list[str], str]:
        """The corpus texts and their description (see :func:`stdlib_corpus`)."""
        if self.corpus is None:
            return stdlib_corpus()
        p = Path(self.corpus).expanduser()
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ConfigError(f"draft_vocab_corpus={str(p)!r} is not UTF-8 text ({e})", param="draft_vocab_corpus") from None
        return [text[i:i + 100_000] for i in range(0, len(text), 100_000)], f"{p.name}, {len(text)} characters"

    def choose(self, tokenizer_path: Path, vocab_size: int, eos: Iterable[int]) -> tuple[np.ndarray, dict] | None:
        """The kept token ids (ascending int32) and the manifest's description, or ``None`` for all.

        Args:
            tokenizer_path: the bundle's ``tokenizer.json``.
            vocab_size: the draft's logits width (rows of its LM head).
            eos: end-of-sequence ids; kept, like every token the tokenizer adds (chat markers).
        """
        if self.size == 0 or self.size >= vocab_size:
            return None
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_path))
        texts, described = self.texts()
        ids = frequent_tokens(token_counts(tokenizer, texts, vocab_size), self.size,
                              set(eos) | set(tokenizer.get_added_tokens_decoder()))
        return ids, {"size": int(len(ids)), "file": f"draft/{FILE_NAME}", "corpus": described}
