"""The failures a user can fix. A command reports each as one line naming the file, row or key."""

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
