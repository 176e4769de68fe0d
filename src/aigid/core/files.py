"""Atomic outputs: everything a stage writes appears complete or not at all.

A file or directory is written at a sibling temporary path and renamed over the destination only when the
writer finished; a crash or an error leaves the previous output (or none) and no temporary behind. An error
of the filesystem (a full disk, a read-only folder) names the output it stopped.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

from aigid.core.errors import DataError, ParamsError, TrackingError


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _full(path: Path) -> bool:
    """Whether the filesystem holding ``path`` (or its nearest existing folder) has no block left for this
    process."""
    folder = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        return os.statvfs(folder).f_bavail == 0
    except OSError:
        return False


@contextlib.contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Name ``path`` in the errors of a block that writes it, so that a failure is one line naming it (see
    :func:`aigid.core.errors.os_error_message`): an OSError without a file name (a full disk when a file is
    written or closed) gets ``path``. Another error is a full disk, and becomes that OSError (the original
    chained to it), when the filesystem holding ``path`` has no free block left (torch.save raises a
    RuntimeError) or its message is the system's for one (safetensors raises its own error, removing the
    partial file, with "No space left on device (os error 28)")."""
    path = Path(path)
    try:
        yield
    except OSError as err:
        if err.filename is None and err.errno is not None:
            err.filename = str(path)
        raise
    except (DataError, ParamsError, TrackingError):
        raise  # already one line naming what is wrong
    except Exception as err:
        full = os.strerror(errno.ENOSPC)
        if full in str(err) or _full(path):
            raise OSError(errno.ENOSPC, full, str(path)) from err
        raise


def _replace(tmp: Path, path: Path) -> None:
    """Move ``tmp`` to ``path``. A directory already at ``path`` (os.replace cannot replace a non-empty one)
    steps aside first and comes back if the move fails."""
    if not (tmp.is_dir() and path.is_dir() and not path.is_symlink()):
        os.replace(tmp, path)
        return
    old = path.with_name(f".{path.name}.old")
    _remove(old)
    os.replace(path, old)
    try:
        os.replace(tmp, path)
    except BaseException:
        os.replace(old, path)
        raise
    _remove(old)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of ``path`` to write (a file or a directory); on success it replaces ``path``.
    On any failure the temporary is removed and ``path`` keeps what it held; an error of the filesystem names
    ``path`` (see :func:`writing`)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove(tmp)
    try:
        with writing(path):  # before the temporary is removed: a full disk is seen as full
            yield tmp
            _replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # the error that stopped the writer is the one to report
            _remove(tmp)
        raise


def write_json(path: str | Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def write_text(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)
