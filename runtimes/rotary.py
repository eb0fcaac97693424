"""Rotary position embedding: the one formula the exporter and the runtime share.

The exporter bakes cos/sin tables into cpu/gpu graphs (:func:`edgellm.export.families.rope_tables`,
which scales these frequencies for ``llama3``, ``yarn``, ...); the runtime feeds them to static
npu graphs per call (:class:`edgellm.runtimes.static_session.StaticDecoderSession`). Both start
from :func:`inv_freq`, so their angles agree bit for bit.
"""

from __future__ import annotations

import numpy as np


def inv_freq(dim: int, theta: float) -> np.ndarray:
    """Default rotary inverse frequencies, float64 ``(dim / 2,)``: ``theta ** -(2i / dim)``."""
    return 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)


def cos_sin(positions: np.ndarray, inv: np.ndarray, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``cos`` and ``sin`` float64 ``(len(positions), len(inv))`` of the angles ``position * inv``, times ``scale``."""
    angles = np.outer(np.asarray(positions, np.float64), inv)
    return np.cos(angles) * scale, np.sin(angles) * scale
