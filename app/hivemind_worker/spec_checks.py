"""The error a refused task spec raises, the path check its fields share, and typed reads of
a spec kept as JSON (TaskSpec.from_dict).

Below tasks.py and task_params.py, so that both (the spec and the parameters of the ml and
data kinds) refuse with the same error; tasks.py re-exports both names.
"""

from __future__ import annotations

import base64
import binascii
import re
from pathlib import PurePosixPath
from typing import TypeVar

from hivemind_worker.errors import ErrorKind, HiveMindError

MAX_INPUT_PATH_LEN = 255


class TaskSpecError(HiveMindError, ValueError):
    """A task spec the worker or pool refuses; `str()` is a reason a submitter can read."""

    kind = ErrorKind.TASK_REJECTED
    title = "Task refused"

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


def safe_relative_path(name: str, field_name: str) -> PurePosixPath:
    """A relative '/'-separated path that cannot leave the folder it is joined to."""
    if not name:
        raise TaskSpecError(field_name, "empty file name")
    if len(name) > MAX_INPUT_PATH_LEN:
        raise TaskSpecError(field_name, f"{name[:80]!r} is longer than {MAX_INPUT_PATH_LEN}")
    if "\x00" in name or any(ord(c) < 32 for c in name):
        raise TaskSpecError(field_name, f"{name[:80]!r} contains control characters")
    if "\\" in name:
        raise TaskSpecError(field_name, f"{name!r} uses backslashes; use '/'")
    if name.startswith("/") or re.match(r"^[A-Za-z]:", name):
        raise TaskSpecError(field_name, f"{name!r} is an absolute path")
    parts = name.split("/")
    for part in parts:
        if part in ("..",):
            raise TaskSpecError(field_name, f"{name!r} leaves the workspace ('..')")
        if part in ("", "."):
            raise TaskSpecError(field_name, f"{name!r} has an empty or '.' component")
        if ":" in part:
            raise TaskSpecError(field_name, f"{name!r} contains ':'")
    return PurePosixPath(*parts)


_T = TypeVar("_T")


_JSON_NAMES: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}


def json_get(data: dict[str, object], key: str, kind: type[_T], default: _T) -> _T:
    value = data.get(key, default)
    if not isinstance(value, kind):
        raise TaskSpecError(key, f"must be {_JSON_NAMES.get(kind, kind.__name__)}")
    return value


def json_strings(data: dict[str, object], key: str) -> list[str]:
    values = json_get(data, key, list, [])
    if not all(isinstance(v, str) for v in values):
        raise TaskSpecError(key, "must be a list of strings")
    return values


def json_str_map(data: dict[str, object], key: str) -> dict[str, str]:
    values = json_get(data, key, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise TaskSpecError(key, "must map names to strings")
    return values


def json_int(data: dict[str, object], key: str, field_name: str = "") -> int:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskSpecError(field_name or key, f"{key} must be an integer")
    return value


def json_float(data: dict[str, object], key: str, field_name: str = "") -> float:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TaskSpecError(field_name or key, f"{key} must be a number")
    return float(value)


def json_base64(text: str, field_name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TaskSpecError(field_name, "is not base64") from None


def json_input_file(entry: object) -> tuple[str, bytes, int]:
    if not isinstance(entry, dict):
        raise TaskSpecError("input_files", "each file must be a JSON object")
    path = json_get(entry, "path", str, "")
    content = json_base64(json_get(entry, "content", str, ""), "input_files")
    return path, content, json_int(entry, "mode", "input_files")
