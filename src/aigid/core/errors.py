"""The failures a user can fix. A command reports each as one line naming the file, row or key; an
operating-system error (full disk, read-only folder, no permission) as one line naming the path."""

from __future__ import annotations

import difflib
from collections.abc import Mapping


class DataError(ValueError):
    """Input data that cannot be used; the message names the split, the row and the file where known."""


class ParamsError(ValueError):
    """A params.yaml value is missing or invalid, or a stage reads a key it does not declare; the message
    names the key."""


class TrackingError(RuntimeError):
    """The MLflow store cannot be used: before any work starts, or when a tracking server stops answering
    during a stage (the stage then ends without writing its outputs)."""


def choice(table: Mapping, name: str, key: str):
    """``table[name]``: a params value that picks an entry of a lookup table (a fusion, a dataset layout, a
    perturbation). The table is the one list of choices; a name it lacks is a ParamsError naming ``key``."""
    if name in table:
        return table[name]
    close = difflib.get_close_matches(str(name), [str(k) for k in table], n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise ParamsError(f"{key}: {name!r} is not one of {', '.join(map(str, table))}{hint}")


def os_error_message(err: OSError) -> str:
    """An operating-system error (full disk, read-only or missing folder, no permission) as one line naming the
    path: ``models/base: No space left on device``. A path where a folder is expected but a file lies names that
    file."""
    import os
    from pathlib import Path

    reason = err.strerror or str(err)
    names = [os.fsdecode(f) for f in (err.filename, err.filename2) if isinstance(f, str | bytes)]
    if isinstance(err, FileExistsError | NotADirectoryError):
        for name in names:
            for p in (Path(name), *Path(name).parents):
                if p.exists() and not p.is_dir():
                    return f"{p}: a file where a folder is expected"
    return f"{' -> '.join(names)}: {reason}" if names else reason
