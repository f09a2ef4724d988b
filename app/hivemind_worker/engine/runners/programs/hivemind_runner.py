"""Shared by the vetted runners, inside the task's sandbox: parameters, progress, errors.

Copied read-only into the task's workspace as `_hivemind/hivemind_runner.py`. Standard
library only. A runner reports:
- progress as `HIVEMIND_PROGRESS {"step": k, "steps": n, "unit": "epoch", ...}` lines;
- a bad input or parameter as one `HIVEMIND_ERROR {"reason": ...}` line and exit code 2,
  the reason naming the file and line or the parameter, never a traceback.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

PROGRESS_PREFIX = "HIVEMIND_PROGRESS "
ERROR_PREFIX = "HIVEMIND_ERROR "
BAD_INPUT_EXIT = 2
HERE = Path(__file__).resolve().parent


class RunnerError(Exception):
    """A bad input or parameter; `str()` is the reason the submitter reads."""


def params() -> dict[str, Any]:
    with open(HERE / "params.json", encoding="utf-8") as fh:
        loaded: dict[str, Any] = json.load(fh)
    return loaded


def workspace() -> Path:
    return HERE.parent


def results_dir() -> Path:
    path = Path(os.environ.get("HIVEMIND_RESULTS_DIR") or workspace() / "results")
    path.mkdir(parents=True, exist_ok=True)
    return path


def input_path(relative: str) -> Path:
    """A path among the task's inputs; the name was checked to stay inside the workspace."""
    path = workspace() / relative
    if not path.exists():
        raise RunnerError(f"{relative}: no such file or folder among the task's inputs")
    return path


def progress(step: int, steps: int, unit: str, **extra: Any) -> None:
    line = {"step": step, "steps": steps, "unit": unit}
    line.update({k: _plain(v) for k, v in extra.items()})
    print(PROGRESS_PREFIX + json.dumps(line), flush=True)


def write_json(name: str, value: Any) -> Path:
    path = results_dir() / name
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(_plain(value), fh, indent=2, sort_keys=False)
        fh.write("\n")
    return path


def write_text(name: str, text: str) -> Path:
    path = results_dir() / name
    path.write_text(text, encoding="utf-8")
    return path


def _plain(value: Any) -> Any:
    """JSON-safe: numpy scalars to Python, NaN and infinities to None."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if hasattr(value, "item") and callable(value.item):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def decode_error_line(data: bytes, position: int) -> tuple[int, int]:
    """(line, column), 1-based, of byte `position` in `data`."""
    before = data[:position]
    line = before.count(b"\n") + 1
    column = position - (before.rfind(b"\n") + 1) + 1
    return line, column


class EpochBudget:
    """Stops a training whose declared epochs cannot finish within the task's timeout.

    After the first epoch the time per epoch is known; a run whose projection is past
    the timeout fails at once with a reason, instead of being killed at the timeout.
    """

    def __init__(self, epochs: int, timeout_seconds: float) -> None:
        self.epochs = epochs
        self.timeout = timeout_seconds
        self.started = time.monotonic()

    def check(self, done: int) -> None:
        if done != 1 or self.timeout <= 0:
            return
        elapsed = time.monotonic() - self.started
        needed = elapsed * self.epochs
        if needed > self.timeout * 0.9:
            raise RunnerError(
                f"ml.epochs: {self.epochs} epochs at about {elapsed:.2g} s each need about "
                f"{needed:.0f} s, beyond the task's timeout of {self.timeout:.0f} s; "
                "lower the epochs or raise the timeout"
            )


def run(main: Callable[[dict[str, Any]], None]) -> NoReturn:
    """Run a runner's `main(params)`: a RunnerError ends it with its reason and exit code 2."""
    try:
        main(params())
    except RunnerError as exc:
        fail(str(exc))
    except MemoryError:
        raise  # the executor reports it as out of memory
    except KeyboardInterrupt:
        raise
    sys.stdout.flush()
    sys.exit(0)


def fail(reason: str) -> NoReturn:
    sys.stdout.flush()
    print(ERROR_PREFIX + json.dumps({"reason": reason}), flush=True)
    with contextlib.suppress(OSError):
        write_text("error.txt", reason + "\n")
    sys.exit(BAD_INPUT_EXIT)
