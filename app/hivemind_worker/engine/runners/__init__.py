"""Vetted runners for the ml and data task kinds, and how a task becomes one of their runs.

A runner is a program of ours (programs/) run on the submitter's data. The engine turns an
ml or data task into a python task before an executor sees it: main.py is the runner,
`_hivemind/` holds its helpers and params.json (read-only), and `environment` names the
pinned requirement set (requirements/<name>.txt) the executor must run it in. So the task
runs in the same sandbox, under the same limits, as any python task; nothing of the
submitter's is executed, and parameters are data in a JSON file.
"""

from __future__ import annotations

import dataclasses
import json
import platform
import sys
import tomllib
from importlib import resources
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from hivemind_worker.engine.events import TaskProgress
from hivemind_worker.task_params import RUNNER_DIR
from hivemind_worker.tasks import (
    InputFile,
    TaskKind,
    TaskResult,
    TaskSpec,
    TaskSpecError,
    TaskStatus,
)

if TYPE_CHECKING:
    from hivemind_worker.config import Settings

PROGRAMS = {
    "scikit-learn": "sklearn_train.py",
    "tensorflow": "keras_train.py",
    "pytorch": "torch_train.py",
    "csv_analysis": "csv_analysis.py",
    "image_processing": "image_processing.py",
    "text_analysis": "text_analysis.py",
}
# The helpers every runner may import from _hivemind/.
HELPERS = ("hivemind_runner.py", "tables.py", "networks.py")
DATA_ENVIRONMENT = "data"
# What each environment's first build downloads, per platform, measured from its pinned set by
# tools/runner_sizes.py. The person is told before turning a framework on (the settings dialog).
SIZES_FILE = "download-sizes.toml"
MEASURED_PLATFORM = "linux-x86_64"  # whose figures stand in for a platform not measured
READ_ONLY = 0o444
# The runner's process environment, set by the worker (a submitter gives none): glibc's
# malloc otherwise reserves an arena of 64 MiB address space per thread, up to 8 per core,
# which TensorFlow's thread pools turn into gigabytes the sandbox's address-space limit counts.
RUNNER_ENV = {"MALLOC_ARENA_MAX": "2"}
# Address space beyond the task's memory that a framework maps without using (thread stacks,
# reserved regions); measured with tensorflow-cpu 2.21 on 2 cores: it fails to start within
# memory + 256 MiB. The process sandbox adds this to its RLIMIT_AS for these environments.
EXTRA_ADDRESS_SPACE = {"tensorflow": 1 << 30}
PROGRESS_PREFIX = "HIVEMIND_PROGRESS "
ERROR_PREFIX = "HIVEMIND_ERROR "


def environment_of(task: TaskSpec) -> str:
    """The requirement set (and capability suffix) an ml or data task runs in."""
    if task.ml is not None:
        return task.ml.framework
    if task.data is not None:
        return DATA_ENVIRONMENT
    raise TaskSpecError("kind", "only ml and data tasks have a runner")


def capability_of(environment: str) -> str:
    return DATA_ENVIRONMENT if environment == DATA_ENVIRONMENT else f"ml:{environment}"


def requirements(environment: str) -> tuple[str, ...]:
    """The pinned requirement lines of one environment."""
    text = _package_file("requirements", f"{environment}.txt")
    lines = (line.strip() for line in text.splitlines())
    return tuple(line for line in lines if line and not line.startswith("#"))


def program_text(name: str) -> str:
    return _package_file("programs", name)


def materialize(task: TaskSpec) -> TaskSpec:
    """The python task that runs `task`'s runner; other tasks are returned unchanged."""
    if not task.kind.runs_a_runner:
        return task
    if task.ml is not None:
        program = PROGRAMS[task.ml.framework]
        params: dict[str, object] = task.ml.to_json()
    elif task.data is not None:
        program = PROGRAMS[task.data.processing]
        params = task.data.to_json()
    else:  # from_proto never builds one
        raise TaskSpecError("kind", f"a {task.kind.value} task without its parameters")
    params["timeout_seconds"] = task.timeout_seconds
    own = [
        InputFile(PurePosixPath(RUNNER_DIR, name), program_text(name).encode(), READ_ONLY)
        for name in HELPERS
    ]
    own.append(
        InputFile(
            PurePosixPath(RUNNER_DIR, "params.json"),
            json.dumps(params, indent=2).encode(),
            READ_ONLY,
        )
    )
    return dataclasses.replace(
        task,
        kind=TaskKind.PYTHON,
        source=program_text(program),
        input_files=(*task.input_files, *own),
        requirements=requirements(environment_of(task)),
        env=dict(RUNNER_ENV),
        environment=environment_of(task),
        ml=None,
        data=None,
    )


def enabled_capabilities(settings: Settings) -> list[str]:
    """The runner capabilities the person's settings allow, in a fixed order."""
    enabled = {
        "scikit-learn": settings.ml_scikit_learn,
        "tensorflow": settings.ml_tensorflow,
        "pytorch": settings.ml_pytorch,
        DATA_ENVIRONMENT: settings.data_processing,
    }
    return [capability_of(name) for name, on in enabled.items() if on]


def platform_key() -> str:
    """This machine as download-sizes.toml names platforms: linux-x86_64, windows-amd64."""
    machine = platform.machine().lower()
    if sys.platform == "win32":
        return "windows-amd64" if machine in ("amd64", "x86_64") else f"windows-{machine}"
    return f"{sys.platform}-{machine}"


def download_mb(environment: str) -> int:
    """What building `environment` downloads the first time on this platform, in MB."""
    table = tomllib.loads(_package_file("requirements", SIZES_FILE))
    figures = table.get(platform_key()) or table[MEASURED_PLATFORM]
    return int(figures[environment])


class ProgressReader:
    """Finds a runner's progress lines in its output, which arrives in arbitrary chunks."""

    MAX_LINE = 4096

    def __init__(self) -> None:
        self._partial = ""

    def feed(self, task_id: str, text: str) -> list[TaskProgress]:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()[-self.MAX_LINE :]
        return [progress_event(task_id, p) for p in map(parse_progress, lines) if p is not None]


def progress_event(task_id: str, fields: dict[str, object]) -> TaskProgress:
    """A runner's progress line as an event; fields of the wrong type are left out."""

    def number(key: str) -> int:
        value = fields.get(key)
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    value = fields.get("value")
    return TaskProgress(
        task_id,
        number("step"),
        number("steps"),
        str(fields.get("unit") or "step")[:32],
        str(fields.get("metric") or "")[:32],
        float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None,
    )


def with_reason(result: TaskResult, task: TaskSpec) -> TaskResult:
    """A failed runner task's error is the reason the runner gave (naming the bad input)."""
    if result.status is TaskStatus.FAILED and (task.kind.runs_a_runner or task.environment):
        result.error = error_reason(result.log_tail) or result.error
    return result


def parse_progress(line: str) -> dict[str, object] | None:
    """The fields of a runner's progress line, or None for any other line."""
    line = line.rstrip("\r")
    if not line.startswith(PROGRESS_PREFIX):
        return None
    try:
        value = json.loads(line[len(PROGRESS_PREFIX) :])
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def error_reason(log_tail: bytes) -> str:
    """The reason a runner gave for failing (its last HIVEMIND_ERROR line), or ""."""
    for raw in reversed(log_tail.decode("utf-8", "replace").splitlines()):
        if raw.startswith(ERROR_PREFIX):
            try:
                reason = json.loads(raw[len(ERROR_PREFIX) :]).get("reason", "")
            except (ValueError, AttributeError):
                return ""
            return str(reason)[:2000]
    return ""


def _package_file(folder: str, name: str) -> str:
    return resources.files(__name__).joinpath(folder, name).read_text(encoding="utf-8")
