"""LoRA adapters at run time: the matrices an adapter binds to the target graph's LoRA branches.

The exporter (:mod:`edgellm.export.lora`) gives the target graph a branch
``(x @ lora.<site>.a) @ lora.<site>.b`` on each linear layer an adapter touches and stores each
adapter as an ``.npz`` of those matrices. :func:`load_adapter` reads one (no pickle) and checks
it against the graph's sites; :meth:`edgellm.runtimes.session.DecoderSession.set_adapter` binds
it per request, so switching adapters reloads nothing.
"""

from __future__ import annotations

import zipfile
from pathlib import Path
from typing import Any

import numpy as np

from edgellm.errors import BundleError


def load_adapter(path: Path, sites: dict[str, list[int]], dtype: str = "float32") -> dict[str, Any]:
    """An adapter's branch matrices as OrtValues by ``<site>.a`` / ``<site>.b``.

    Args:
        path: the adapter's ``.npz``: per site, ``<site>.a`` ``(in, R)`` and ``<site>.b`` ``(R, out)``.
        sites: the graph's LoRA sites, ``{tag: [in, out]}`` (the manifest's ``models.target.lora``).
        dtype: the graph's branch dtype (``float32``, or ``float16`` in gpu bundles).

    Raises:
        BundleError: the file is not such an archive, or names a site or shape the graph lacks.
    """
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        raise BundleError(f"{path}: not an adapter archive ({e})") from None
    for key, arr in arrays.items():
        tag, _, part = key.rpartition(".")
        if tag not in sites or part not in ("a", "b"):
            raise BundleError(f"{path}: {key!r} is not a LoRA site of this graph (the bundle mixes two exports?)")
        other = arrays.get(f"{tag}.{'b' if part == 'a' else 'a'}")
        din, dout = sites[tag]
        rank = (arr.shape[1] if part == "a" else arr.shape[0]) if arr.ndim == 2 else -1
        want = (din, rank) if part == "a" else (rank, dout)
        if arr.ndim != 2 or arr.shape != want or other is None or other.ndim != 2 or rank not in other.shape:
            raise BundleError(f"{path}: {key} has shape {list(arr.shape)}; the graph's site takes [{din}, r] and "
                              f"[r, {dout}] with the same r")
    return ort_values(arrays, dtype)


def ort_values(arrays: dict[str, np.ndarray], dtype: str = "float32") -> dict[str, Any]:
    """Branch matrices by name as OrtValues of ``dtype`` (what a session binds; see ``set_adapter``)."""
    import onnxruntime as ort

    return {k: ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(v, dtype=np.dtype(dtype)))
            for k, v in arrays.items()}
