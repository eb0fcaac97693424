"""Writing a bundle safely: into a temporary sibling folder, renamed into place at the end.

Ctrl-C and SIGTERM remove the temporary folder; a later export of the same output removes the
folders of exports whose process died; only a bundle folder is ever replaced.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Callable

from edgellm.errors import ConfigError, EdgeLLMError, ExportError

logger = logging.getLogger(__name__)

@contextlib.contextmanager
def writing(out: Path, overwrite: bool, what: str = "export"):
    """A temporary folder beside ``out`` that replaces ``out`` when the block ends, and is removed
    if it does not (an error, Ctrl-C, SIGTERM): ``with writing(out, overwrite) as tmp: ...``.

    Raises:
        ConfigError: see :func:`start_output`.
        ExportError: ``"<what> failed: ..."`` for an unexpected error inside the block (edgellm's
            own errors, interrupts and MemoryError pass through as they are).
    """
    with sigterm_as_exit():  # before the temporary folder exists: a SIGTERM at any point cleans it up
        tmp = start_output(out, overwrite)
        try:
            yield tmp
            (tmp / PARTIAL_OWNER).unlink()  # it marks a folder being written, not part of the bundle
            replace_folder(tmp, out)
        except BaseException as e:
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, (EdgeLLMError, KeyboardInterrupt, SystemExit, MemoryError)):
                raise
            raise ExportError(f"{what} failed: {type(e).__name__}: {e}") from e


PARTIAL_OWNER = ".edgellm-export-pid"  # inside a partial folder: the pid of the export writing it


def start_output(out: Path, overwrite: bool) -> Path:
    """Check ``out`` can be written (before any work) and create the temporary folder beside it.

    Also removes what earlier exports of the same ``out`` left behind when they died
    (``.NAME.partial-*`` folders whose process is gone, ``.NAME.old-*`` folders).

    Raises:
        ConfigError: ``out`` exists (without ``overwrite``), is a file, or is a folder that is not a
            bundle; its parent cannot be created or written.
    """
    if out.exists() or out.is_symlink():
        if not overwrite:
            raise ConfigError(f"output {str(out)!r} already exists; pass overwrite=True (--overwrite) to replace it",
                              param="output")
        if out.is_symlink() or not out.is_dir():
            raise ConfigError(f"output {str(out)!r} is {'a link' if out.is_symlink() else 'a file'}, not a bundle "
                              "folder; refusing to replace it (give a folder path)", param="output")
        if not (out / "manifest.json").is_file() and any(out.iterdir()):
            raise ConfigError(f"output {str(out)!r} is a non-empty folder that is not a bundle; refusing to replace it",
                              param="output")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
        (tmp / PARTIAL_OWNER).write_text(str(os.getpid()))
    except OSError as e:
        where = e.filename or out.parent
        raise ConfigError(f"output {str(out)!r}: cannot create the bundle there: {e.strerror or e} ({where}); give a "
                          "folder path whose parent is a writable folder", param="output") from None
    return tmp


def _remove_stale(out: Path) -> None:
    """Remove leftovers of earlier exports of ``out`` whose process no longer runs."""
    for p in out.parent.glob(f".{out.name}.partial-*"):
        try:
            pid = int((p / PARTIAL_OWNER).read_text())
        except (OSError, ValueError):
            pid = None  # no owner file: written by an edgellm before it had one, or half-created
        if pid is not None and pid != os.getpid() and _alive(pid):
            continue  # another export of the same output is running: leave its folder alone
        logger.info("removing %s, left by an export that did not finish", p)
        shutil.rmtree(p, ignore_errors=True)
    for p in out.parent.glob(f".{out.name}.old-*"):
        shutil.rmtree(p, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def sigterm_as_exit():
    """Turn SIGTERM into ``SystemExit(143)`` while exporting, so the temporary folder is removed
    as on Ctrl-C (only in the main thread: signal handlers cannot be set elsewhere)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def progress_printer(progress: Callable[[str], None] | None, t0: float) -> Callable[[str], None]:
    def say(msg: str) -> None:
        line = f"[{time.perf_counter() - t0:7.1f}s] {msg}"
        logger.info(line)
        if progress:
            progress(line)

    return say


def replace_folder(tmp: Path, out: Path) -> None:
    if out.exists():
        trash = out.with_name(f".{out.name}.old-{int(time.time())}")
        out.rename(trash)
        tmp.rename(out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        tmp.rename(out)
