"""The one reader for the tables users bring (captions, labels, detect's captions): .csv and .xlsx.

Every problem becomes one :class:`~aigid.core.errors.DataError` line, ``<file>: <what is wrong> (<how to fix>)``,
naming the row and column where there is one. Rows are numbered as a spreadsheet shows them: the header is
row 1, the first data row is row 2. CSV files are read as UTF-8 (with or without a byte-order mark); any
other encoding is refused with the offset of the first byte that is not UTF-8. Every cell is read as text and
converted by the caller (:func:`integers`), so "007", "" or "sdxl" in a label column is reported, not guessed.
"""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import pandas as pd

from aigid.core.errors import DataError

FIRST_ROW = 2  # the header is row 1


def read_table(path: Path, columns: tuple[str, ...]) -> pd.DataFrame:
    """``path`` (.csv or .xlsx) as a frame of strings with at least ``columns``."""
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise DataError(f"{path}: the file is empty (it needs a header row with {', '.join(columns)})")
    frame = _xlsx(path, data) if path.suffix.lower() == ".xlsx" else _csv(path, data)
    frame.columns = [str(c).strip() for c in frame.columns]
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        raise DataError(
            f"{path}: missing column(s) {', '.join(missing)} (found: {', '.join(frame.columns)}; "
            f"the first row must name the columns)"
        )
    return frame


def _csv(path: Path, data: bytes) -> pd.DataFrame:
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        raise DataError(
            f"{path}: not UTF-8 text: byte {err.start} is 0x{data[err.start]:02x} (save the table as "
            f"UTF-8 CSV; spreadsheet programs offer 'CSV UTF-8')"
        ) from None
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, keep_default_na=False)
    except (pd.errors.ParserError, pd.errors.EmptyDataError) as err:
        raise DataError(
            f"{path}: not a readable CSV table: {str(err).strip()} (check the quoting and that every "
            f"row has as many fields as the header)"
        ) from None


def _xlsx(path: Path, data: bytes) -> pd.DataFrame:
    if not zipfile.is_zipfile(io.BytesIO(data)):
        looks = "it looks like CSV text: rename it to .csv" if _is_text(data) else "re-save it as .xlsx or .csv"
        raise DataError(f"{path}: not an .xlsx workbook ({looks})")
    try:
        frame = pd.read_excel(io.BytesIO(data), dtype=str, keep_default_na=False)
    except Exception as err:  # openpyxl and zipfile raise many types for a damaged workbook
        raise DataError(
            f"{path}: not a readable .xlsx workbook ({type(err).__name__}: {err}) (re-save it from a "
            f"spreadsheet program, or save the table as .csv)"
        ) from None
    return frame


def _is_text(data: bytes) -> bool:
    try:
        data[:4096].decode("utf-8")
    except UnicodeDecodeError:
        return False
    return b"\0" not in data[:4096]


def integers(frame: pd.DataFrame, column: str, path: Path, allowed: range | None = None) -> list[int]:
    """The cells of ``column`` as integers; a blank, text, fractional or out-of-range cell is an error naming
    its row. ``allowed`` lists the valid values (labels)."""
    out = []
    for i, cell in enumerate(frame[column]):
        text = str(cell).strip()
        try:
            value = int(float(text)) if text.endswith(".0") else int(text)
        except ValueError:
            what = "is blank" if not text else f"is {text!r}, not an integer"
            raise DataError(
                f"{path} row {i + FIRST_ROW}, column {column}: {what}"
                + (f" (expected one of {allowed.start}..{allowed.stop - 1})" if allowed else "")
            ) from None
        if allowed is not None and value not in allowed:
            raise DataError(
                f"{path} row {i + FIRST_ROW}, column {column}: {value} is not one of "
                f"{allowed.start}..{allowed.stop - 1}"
            )
        out.append(value)
    return out


def duplicates(keys: list, path: Path, column: str) -> dict:
    """Keys that appear more than once -> a message naming every row that holds them."""
    rows: dict = {}
    for i, key in enumerate(keys):
        rows.setdefault(key, []).append(i + FIRST_ROW)
    return {
        key: f"{path}: {column}={key} appears in rows {', '.join(map(str, at))} (each {column} must be unique)"
        for key, at in rows.items()
        if len(at) > 1
    }
