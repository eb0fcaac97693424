"""Two graphs of one model reading the same weights from one external-data file.

An npu draft has a one-token step graph beside its window graph (see
:mod:`edgellm.export.static_builder`); both are built from the same weights, so their large
initializers are byte-identical. :func:`share_weights` points every initializer of the second
graph that the first graph already stores at the first graph's data file (same offset and
length) and keeps only the others in a data file of its own, so the bundle stores the weights
once. ONNX external data is just (file, offset, length): onnxruntime reads either graph as
before.
"""

from __future__ import annotations

import hashlib
from pathlib import Path


def _external(tensor) -> dict[str, str] | None:
    from onnx import TensorProto

    if tensor.data_location != TensorProto.EXTERNAL:
        return None
    return {e.key: e.value for e in tensor.external_data}


def _read(folder: Path, ext: dict[str, str]) -> bytes:
    with open(folder / ext["location"], "rb") as f:
        f.seek(int(ext.get("offset", 0)))
        return f.read(int(ext["length"]))


def share_weights(primary: Path, secondary: Path) -> int:
    """Rewrite ``secondary`` so the initializers it shares with ``primary`` are read from ``primary``'s data.

    Both graphs must be in the same folder, with their initializers in external data files.
    ``secondary``'s own data file is replaced by one holding only what ``primary`` lacks (or
    removed when nothing is left).

    Returns:
        The number of bytes no longer stored twice.
    """
    import onnx

    folder = primary.parent
    if secondary.parent != folder:
        raise ValueError(f"{primary} and {secondary} must be in one folder")
    first = onnx.load(str(primary), load_external_data=False)
    known: dict[tuple[str, int], dict[str, str]] = {}
    for t in first.graph.initializer:
        ext = _external(t)
        if ext is not None:
            known[(hashlib.sha256(_read(folder, ext)).hexdigest(), int(ext["length"]))] = ext

    second = onnx.load(str(secondary), load_external_data=False)
    own = secondary.with_name(secondary.name + ".data")
    staging = secondary.with_name(secondary.name + ".data.tmp")
    saved, old_files = 0, set()
    with open(staging, "wb") as out:
        for t in second.graph.initializer:
            ext = _external(t)
            if ext is None:
                continue
            old_files.add(ext["location"])
            data = _read(folder, ext)
            match = known.get((hashlib.sha256(data).hexdigest(), len(data)))
            if match is not None:
                new = {"location": match["location"], "offset": match.get("offset", "0"), "length": match["length"]}
                saved += len(data)
            else:
                out.write(b"\0" * ((-out.tell()) % 4096))  # page-aligned, as the builder writes them
                new = {"location": own.name, "offset": str(out.tell()), "length": str(len(data))}
                out.write(data)
            del t.external_data[:]
            for k, v in new.items():
                e = t.external_data.add()
                e.key, e.value = k, v
        kept = out.tell()
    for name in old_files - {p.name for p in (primary, secondary)}:
        if name not in {e["location"] for e in known.values()}:
            (folder / name).unlink(missing_ok=True)
    if kept:
        staging.rename(own)
    else:
        staging.unlink()
    onnx.save(second, str(secondary))
    return saved
