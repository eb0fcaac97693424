"""A bundle on disk: its manifest read (:func:`read_manifest`) and its files checked against it
(:func:`verify_files`, :func:`check_bundle`)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from edgellm.errors import BundleError, ManifestError
from edgellm.manifest import MANIFEST_NAME, Manifest, parse_manifest


def read_manifest(bundle: Path) -> Manifest:
    """Read and validate ``bundle/manifest.json``.

    Raises:
        BundleError: the folder or the manifest does not exist.
        ManifestError: the manifest is not valid JSON or not a valid manifest.
    """
    if not bundle.exists():
        raise BundleError(f"bundle {str(bundle)!r} does not exist")
    if not bundle.is_dir():
        raise BundleError(f"bundle {str(bundle)!r} is not a folder (expected the folder `edgellm export` wrote)")
    path = bundle / MANIFEST_NAME
    if not path.is_file():
        raise BundleError(f"{str(bundle)!r} is not an edgellm bundle: no {MANIFEST_NAME}")
    if path.resolve().parent != bundle.resolve():
        raise BundleError(f"{path}: a link to a file outside the bundle; the manifest must be inside it")
    try:
        doc = json.loads(path.read_text(encoding="utf-8"), parse_constant=_no_constant)
    except OSError as e:
        raise BundleError(f"{path}: cannot read it ({e.strerror or e})") from e
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise ManifestError(f"{path}: not valid JSON ({e})") from None
    return parse_manifest(doc)


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not a JSON value")


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def verify_files(bundle: Path, manifest: Manifest, *, verify: bool = True) -> list[str]:
    """Check every file the manifest lists. Returns the problems found (empty when intact).

    Args:
        bundle: the bundle folder.
        manifest: its parsed manifest.
        verify: compare sha256 too (sizes are always compared); the same name as ``edgellm.load``'s.
    """
    problems = []
    if manifest.integrity == "edited":
        problems.append(f"{MANIFEST_NAME}: edited after export (its contents do not match its manifest_sha256)")
    root = bundle.resolve()
    for rel, meta in manifest.files.items():
        p = (bundle / rel).resolve()
        if root not in p.parents:
            problems.append(f"{rel}: resolves outside the bundle")
            continue
        if not p.is_file():
            problems.append(f"{rel}: missing")
            continue
        size = p.stat().st_size
        if size != meta["size"]:
            problems.append(f"{rel}: size {size} bytes, manifest says {meta['size']} (truncated or replaced)")
        elif verify and sha256_file(p) != meta["sha256"]:
            problems.append(f"{rel}: sha256 does not match the manifest (modified after export)")
    return problems


def check_bundle(bundle: Path, manifest: Manifest, *, verify: bool = True) -> None:
    """Raise :class:`BundleError` naming every damaged file, if any."""
    problems = verify_files(bundle, manifest, verify=verify)
    if problems:
        raise BundleError(f"bundle {str(bundle)!r} is damaged: " + "; ".join(problems))
