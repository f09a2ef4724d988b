"""Reading the submitter's tables (CSV, Parquet) with reasons that name the file and line.

Copied read-only into the workspace as `_hivemind/tables.py`; needs pandas.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import hivemind_runner as hr
import pandas as pd

PARQUET_SUFFIXES = (".parquet", ".pq")


def read_table(path: Path, name: str, delimiter: str = ",") -> pd.DataFrame:
    if path.is_dir():
        raise hr.RunnerError(f"{name}: is a folder; give a CSV or Parquet file")
    data = path.read_bytes()
    if path.suffix.lower() in PARQUET_SUFFIXES:
        try:
            return pd.read_parquet(io.BytesIO(data))
        except Exception as exc:  # pyarrow raises several types for a damaged file
            raise hr.RunnerError(f"{name}: not a Parquet file pyarrow can read ({exc})") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line, column = hr.decode_error_line(data, exc.start)
        raise hr.RunnerError(
            f"{name} line {line}: not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
            f"{column}); save the file as UTF-8"
        ) from None
    if not text.strip():
        raise hr.RunnerError(f"{name}: the file is empty")
    try:
        frame = pd.read_csv(io.StringIO(text), sep=delimiter)
    except pd.errors.ParserError as exc:
        detail = str(exc).split("C error: ")[-1].strip()
        match = re.search(r"line (\d+)", detail)
        where = f" line {match.group(1)}" if match else ""
        raise hr.RunnerError(f"{name}{where}: malformed CSV ({detail})") from None
    except pd.errors.EmptyDataError:
        raise hr.RunnerError(f"{name}: the file holds no columns") from None
    if frame.columns.duplicated().any():
        dupes = sorted({str(c) for c in frame.columns[frame.columns.duplicated()]})
        raise hr.RunnerError(f"{name} line 1: column names given twice: {', '.join(dupes)}")
    return frame


def require_columns(frame: pd.DataFrame, columns: list[str], name: str, field: str) -> None:
    missing = [c for c in columns if c not in frame.columns]
    if missing:
        have = ", ".join(map(str, frame.columns[:20]))
        raise hr.RunnerError(
            f"{field}: column {missing[0]!r} is not in {name} (its columns: {have})"
        )


def first_bad_row(series: Any) -> int:
    """The file line of the first value pandas could not read as a number (header: line 1)."""
    numeric = pd.to_numeric(series, errors="coerce")
    bad = numeric.isna() & series.notna()
    position = int(bad.to_numpy().argmax())
    return position + 2
