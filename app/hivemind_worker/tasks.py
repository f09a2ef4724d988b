"""TaskSpec and TaskResult domain objects, validated from the wire before anything runs."""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath
from typing import TypeVar

from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.protocol import nodepool_pb2 as pb

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB

# Bounds on what a task may ask for. The pool refuses specs outside them on submit and the
# worker checks again on receipt: the pool is trusted with scheduling, not with our safety.
MAX_ID_LEN = 128
MAX_NAME_LEN = 200
MAX_ARGV_ITEMS = 256
MAX_ARGV_BYTES = 64 * KiB
MAX_ENV_ITEMS = 128
MAX_ENV_VALUE_BYTES = 32 * KiB
MAX_INPUT_FILES = 1000
MAX_INPUT_PATH_LEN = 255
MAX_INPUT_BYTES = 16 * MiB  # inline files plus archive
MAX_SOURCE_BYTES = 1 * MiB
MAX_REQUIREMENTS = 100
MAX_REQUIREMENT_LEN = 200
MAX_IMAGE_LEN = 255
MAX_CPUS = 1024.0
MAX_MEMORY_BYTES = 1024 * GiB
MAX_DISK_BYTES = 16 * 1024 * GiB
MAX_GPUS = 64
MAX_TIMEOUT_SECONDS = 7 * 86400
MAX_RESULT_BYTES = 1 * GiB

DEFAULT_CPUS = 1.0
DEFAULT_MEMORY_BYTES = 512 * MiB
DEFAULT_DISK_BYTES = 1 * GiB
DEFAULT_TIMEOUT_SECONDS = 600
DEFAULT_RESULT_PATH = "results"
DEFAULT_MAX_RESULT_BYTES = 64 * MiB
ALLOWED_NETWORKS = ("none", "bridge")

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_ENV_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
# name[:tag][@sha256:digest], with an optional registry host[:port]/ prefix.
_IMAGE_RE = re.compile(
    r"^(?:[a-z0-9.-]+(?::[0-9]+)?/)?[a-z0-9]+(?:[._-][a-z0-9]+)*(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[a-f0-9]{64})?$"
)


class TaskSpecError(HiveMindError, ValueError):
    """A task spec the worker or pool refuses; `str()` is a reason a submitter can read."""

    kind = ErrorKind.TASK_REJECTED
    title = "Task refused"

    def __init__(self, field_name: str, reason: str) -> None:
        super().__init__(f"{field_name}: {reason}")
        self.field = field_name
        self.reason = reason


class TaskKind(StrEnum):
    CONTAINER = "container"
    PYTHON = "python"


class TaskStatus(StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    TIMED_OUT = "timed_out"
    CANCELLED = "cancelled"
    REJECTED = "rejected"
    OUT_OF_MEMORY = "out_of_memory"

    @property
    def is_final(self) -> bool:
        return self not in (TaskStatus.QUEUED, TaskStatus.RUNNING)

    def to_proto(self) -> pb.TaskStatus.ValueType:
        return _STATUS_TO_PB[self]

    @classmethod
    def from_proto(cls, value: int) -> TaskStatus:
        try:
            return _PB_TO_STATUS[pb.TaskStatus.ValueType(value)]
        except KeyError:
            raise TaskSpecError("status", f"unknown task status {value}") from None


_STATUS_TO_PB: dict[TaskStatus, pb.TaskStatus.ValueType] = {
    TaskStatus.QUEUED: pb.TASK_STATUS_QUEUED,
    TaskStatus.RUNNING: pb.TASK_STATUS_RUNNING,
    TaskStatus.SUCCEEDED: pb.TASK_STATUS_SUCCEEDED,
    TaskStatus.FAILED: pb.TASK_STATUS_FAILED,
    TaskStatus.TIMED_OUT: pb.TASK_STATUS_TIMED_OUT,
    TaskStatus.CANCELLED: pb.TASK_STATUS_CANCELLED,
    TaskStatus.REJECTED: pb.TASK_STATUS_REJECTED,
    TaskStatus.OUT_OF_MEMORY: pb.TASK_STATUS_OUT_OF_MEMORY,
}
_PB_TO_STATUS = {v: k for k, v in _STATUS_TO_PB.items()}
_KIND_FROM_PB = {pb.TASK_KIND_CONTAINER: TaskKind.CONTAINER, pb.TASK_KIND_PYTHON: TaskKind.PYTHON}
_KIND_TO_PB = {v: k for k, v in _KIND_FROM_PB.items()}


@dataclass(frozen=True)
class Resources:
    cpus: float = 0.0
    memory_bytes: int = 0
    disk_bytes: int = 0
    gpus: int = 0

    def __add__(self, other: Resources) -> Resources:
        return Resources(
            self.cpus + other.cpus,
            self.memory_bytes + other.memory_bytes,
            self.disk_bytes + other.disk_bytes,
            self.gpus + other.gpus,
        )

    def __sub__(self, other: Resources) -> Resources:
        return Resources(
            self.cpus - other.cpus,
            self.memory_bytes - other.memory_bytes,
            self.disk_bytes - other.disk_bytes,
            self.gpus - other.gpus,
        )

    def fits_in(self, free: Resources) -> bool:
        # A tiny tolerance keeps 0.1 + 0.2 style float sums from refusing an exact fit.
        return (
            self.cpus <= free.cpus + 1e-9
            and self.memory_bytes <= free.memory_bytes
            and self.disk_bytes <= free.disk_bytes
            and self.gpus <= free.gpus
        )

    def clamp_at_zero(self) -> Resources:
        return Resources(
            max(self.cpus, 0.0),
            max(self.memory_bytes, 0),
            max(self.disk_bytes, 0),
            max(self.gpus, 0),
        )

    def to_proto(self) -> pb.Resources:
        return pb.Resources(
            cpus=self.cpus,
            memory_bytes=self.memory_bytes,
            disk_bytes=self.disk_bytes,
            gpus=self.gpus,
        )

    @classmethod
    def from_proto(cls, msg: pb.Resources) -> Resources:
        return cls(msg.cpus, msg.memory_bytes, msg.disk_bytes, msg.gpus)


@dataclass(frozen=True)
class InputFile:
    path: PurePosixPath
    content: bytes
    mode: int = 0o644


@dataclass(frozen=True)
class TaskSpec:
    task_id: str
    kind: TaskKind
    resources: Resources
    timeout_seconds: int
    lease_id: str = ""
    image: str = ""
    argv: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)
    input_files: tuple[InputFile, ...] = ()
    input_archive: bytes = b""
    network: str = "none"
    result_path: PurePosixPath = PurePosixPath(DEFAULT_RESULT_PATH)  # noqa: RUF009 - immutable
    max_result_bytes: int = DEFAULT_MAX_RESULT_BYTES
    source: str = ""
    requirements: tuple[str, ...] = ()
    attempt: int = 0
    name: str = ""
    max_attempts: int = 0

    @property
    def label(self) -> str:
        """What the person sees for this task."""
        return self.name or self.task_id

    @classmethod
    def from_proto(
        cls, msg: pb.TaskSpec, *, require_id: bool = True, require_lease: bool = False
    ) -> TaskSpec:
        """Validate a wire spec, apply defaults, and raise TaskSpecError naming the bad field."""
        return cls._validated(
            _Fields(
                task_id=msg.task_id,
                lease_id=msg.lease_id,
                kind=_KIND_FROM_PB.get(msg.kind),
                name=msg.name,
                argv=tuple(msg.argv),
                image=msg.image,
                source=msg.source,
                requirements=tuple(msg.requirements),
                env=dict(msg.env),
                input_files=[(f.path, f.content, f.mode) for f in msg.input_files],
                input_archive=msg.input_archive,
                resources=(
                    msg.resources.cpus,
                    msg.resources.memory_bytes,
                    msg.resources.disk_bytes,
                    msg.resources.gpus,
                ),
                timeout_seconds=msg.timeout_seconds,
                network=msg.network,
                result_path=msg.result_path,
                max_result_bytes=msg.max_result_bytes,
                attempt=msg.attempt,
                max_attempts=msg.max_attempts,
            ),
            require_id=require_id,
            require_lease=require_lease,
        )

    @classmethod
    def from_dict(
        cls, data: object, *, require_id: bool = True, require_lease: bool = False
    ) -> TaskSpec:
        """A spec from its to_dict() form (parsed JSON), validated exactly as from_proto()
        validates the wire form; raises TaskSpecError naming the bad field."""
        if not isinstance(data, dict):
            raise TaskSpecError("spec", "must be a JSON object")
        unknown = set(data) - set(_Fields.__dataclass_fields__)
        if unknown:
            raise TaskSpecError(sorted(unknown)[0], "is not a field of a task spec")
        kind_name = _get(data, "kind", str, "")
        files = _get(data, "input_files", list, [])
        resources = _get(data, "resources", dict, {})
        return cls._validated(
            _Fields(
                task_id=_get(data, "task_id", str, ""),
                lease_id=_get(data, "lease_id", str, ""),
                kind=TaskKind(kind_name) if kind_name in tuple(TaskKind) else None,
                name=_get(data, "name", str, ""),
                argv=tuple(_strings(data, "argv")),
                image=_get(data, "image", str, ""),
                source=_get(data, "source", str, ""),
                requirements=tuple(_strings(data, "requirements")),
                env=_str_map(data, "env"),
                input_files=[_input_file(f) for f in files],
                input_archive=_base64(_get(data, "input_archive", str, ""), "input_archive"),
                resources=(
                    _float(resources, "cpus", "resources"),
                    _int(resources, "memory_bytes", "resources"),
                    _int(resources, "disk_bytes", "resources"),
                    _int(resources, "gpus", "resources"),
                ),
                timeout_seconds=_int(data, "timeout_seconds"),
                network=_get(data, "network", str, ""),
                result_path=_get(data, "result_path", str, ""),
                max_result_bytes=_int(data, "max_result_bytes"),
                attempt=_int(data, "attempt"),
                max_attempts=_int(data, "max_attempts"),
            ),
            require_id=require_id,
            require_lease=require_lease,
        )

    def to_dict(self) -> dict[str, object]:
        """The spec as JSON-ready data (bytes in base64) that from_dict() reads back."""
        return {
            "task_id": self.task_id,
            "lease_id": self.lease_id,
            "kind": self.kind.value,
            "name": self.name,
            "argv": list(self.argv),
            "image": self.image,
            "source": self.source,
            "requirements": list(self.requirements),
            "env": dict(self.env),
            "input_files": [
                {
                    "path": str(f.path),
                    "content": base64.b64encode(f.content).decode("ascii"),
                    "mode": f.mode,
                }
                for f in self.input_files
            ],
            "input_archive": base64.b64encode(self.input_archive).decode("ascii"),
            "resources": {
                "cpus": self.resources.cpus,
                "memory_bytes": self.resources.memory_bytes,
                "disk_bytes": self.resources.disk_bytes,
                "gpus": self.resources.gpus,
            },
            "timeout_seconds": self.timeout_seconds,
            "network": self.network,
            "result_path": str(self.result_path),
            "max_result_bytes": self.max_result_bytes,
            "attempt": self.attempt,
            "max_attempts": self.max_attempts,
        }

    @classmethod
    def _validated(cls, msg: _Fields, *, require_id: bool, require_lease: bool) -> TaskSpec:
        """The checks and defaults of every way a spec comes in (wire, kept JSON)."""
        task_id = msg.task_id
        if task_id or require_id:
            _check_id("task_id", task_id)
        if require_lease or msg.lease_id:
            _check_id("lease_id", msg.lease_id)
        kind = msg.kind
        if kind is None:
            raise TaskSpecError("kind", "must be 'container' or 'python'")
        if len(msg.name) > MAX_NAME_LEN:
            raise TaskSpecError("name", f"longer than {MAX_NAME_LEN} characters")
        if any(ord(c) < 32 for c in msg.name):
            raise TaskSpecError("name", "contains control characters")

        argv = msg.argv
        if len(argv) > MAX_ARGV_ITEMS:
            raise TaskSpecError("argv", f"more than {MAX_ARGV_ITEMS} items")
        if sum(len(a.encode()) for a in argv) > MAX_ARGV_BYTES:
            raise TaskSpecError("argv", f"larger than {MAX_ARGV_BYTES} bytes in total")
        if any("\x00" in a for a in argv):
            raise TaskSpecError("argv", "contains a NUL character")

        image = msg.image
        source = msg.source
        if kind is TaskKind.CONTAINER:
            if not image:
                raise TaskSpecError("image", "a container task needs an image")
            if not argv:
                raise TaskSpecError("argv", "a container task needs a command (argv is empty)")
        else:
            if not source.strip():
                raise TaskSpecError("source", "a python task needs source code")
            if len(source.encode()) > MAX_SOURCE_BYTES:
                raise TaskSpecError("source", f"larger than {MAX_SOURCE_BYTES} bytes")
            if "\x00" in source:
                raise TaskSpecError("source", "contains a NUL character")
        if image and not image_reference_ok(image):
            raise TaskSpecError("image", f"{image[:80]!r} is not a valid image reference")

        requirements = msg.requirements
        if len(requirements) > MAX_REQUIREMENTS:
            raise TaskSpecError("requirements", f"more than {MAX_REQUIREMENTS} lines")
        for req in requirements:
            if len(req) > MAX_REQUIREMENT_LEN or not req.strip() or "\n" in req:
                raise TaskSpecError("requirements", f"bad requirement line {req[:80]!r}")

        if len(msg.env) > MAX_ENV_ITEMS:
            raise TaskSpecError("env", f"more than {MAX_ENV_ITEMS} variables")
        env: dict[str, str] = {}
        for name, value in msg.env.items():
            if not _ENV_NAME_RE.match(name) or len(name) > 128:
                raise TaskSpecError("env", f"{name[:80]!r} is not a valid variable name")
            if len(value.encode()) > MAX_ENV_VALUE_BYTES or "\x00" in value:
                raise TaskSpecError("env", f"value of {name} is too large or contains NUL")
            env[name] = value

        if len(msg.input_files) > MAX_INPUT_FILES:
            raise TaskSpecError("input_files", f"more than {MAX_INPUT_FILES} files")
        files: list[InputFile] = []
        seen: set[PurePosixPath] = set()
        total = len(msg.input_archive)
        for name, content, file_mode in msg.input_files:
            path = safe_relative_path(name, "input_files")
            if path in seen:
                raise TaskSpecError("input_files", f"{name!r} is given twice")
            seen.add(path)
            mode = file_mode or 0o644
            if mode & ~0o777:
                raise TaskSpecError("input_files", f"{name!r} has mode {oct(mode)}")
            total += len(content)
            files.append(InputFile(path, content, mode))
        if total > MAX_INPUT_BYTES:
            raise TaskSpecError("input_files", f"inputs larger than {MAX_INPUT_BYTES} bytes")

        cpus, memory_bytes, disk_bytes, gpus = msg.resources
        if cpus < 0 or memory_bytes < 0 or disk_bytes < 0 or gpus < 0:
            raise TaskSpecError("resources", "negative values are not allowed")
        if not (cpus <= MAX_CPUS):  # also catches NaN
            raise TaskSpecError("resources", f"cpus must be at most {MAX_CPUS:g}")
        if memory_bytes > MAX_MEMORY_BYTES or disk_bytes > MAX_DISK_BYTES:
            raise TaskSpecError("resources", "memory or disk request is beyond any machine")
        if gpus > MAX_GPUS:
            raise TaskSpecError("resources", f"gpus must be at most {MAX_GPUS}")
        resources = Resources(
            cpus or DEFAULT_CPUS,
            memory_bytes or DEFAULT_MEMORY_BYTES,
            disk_bytes or DEFAULT_DISK_BYTES,
            gpus,
        )

        timeout = msg.timeout_seconds or DEFAULT_TIMEOUT_SECONDS
        if timeout > MAX_TIMEOUT_SECONDS:
            raise TaskSpecError("timeout_seconds", f"must be at most {MAX_TIMEOUT_SECONDS}")
        network = msg.network or "none"
        if network not in ALLOWED_NETWORKS:
            raise TaskSpecError("network", f"must be one of {', '.join(ALLOWED_NETWORKS)}")
        result_path = safe_relative_path(msg.result_path or DEFAULT_RESULT_PATH, "result_path")
        max_result = msg.max_result_bytes or DEFAULT_MAX_RESULT_BYTES
        if not 0 < max_result <= MAX_RESULT_BYTES:
            raise TaskSpecError("max_result_bytes", f"must be between 1 and {MAX_RESULT_BYTES}")

        return cls(
            task_id=task_id,
            lease_id=msg.lease_id,
            kind=kind,
            image=image,
            argv=argv,
            env=env,
            input_files=tuple(files),
            input_archive=msg.input_archive,
            resources=resources,
            timeout_seconds=timeout,
            network=network,
            result_path=result_path,
            max_result_bytes=max_result,
            source=source,
            requirements=requirements,
            attempt=msg.attempt,
            name=msg.name,
            max_attempts=msg.max_attempts,
        )

    def to_proto(self) -> pb.TaskSpec:
        return pb.TaskSpec(
            task_id=self.task_id,
            lease_id=self.lease_id,
            kind=_KIND_TO_PB[self.kind],
            image=self.image,
            argv=list(self.argv),
            env=dict(self.env),
            input_files=[
                pb.InputFile(path=str(f.path), content=f.content, mode=f.mode)
                for f in self.input_files
            ],
            input_archive=self.input_archive,
            resources=self.resources.to_proto(),
            timeout_seconds=self.timeout_seconds,
            network=self.network,
            result_path=str(self.result_path),
            max_result_bytes=self.max_result_bytes,
            source=self.source,
            requirements=list(self.requirements),
            attempt=self.attempt,
            name=self.name,
            max_attempts=self.max_attempts,
        )


@dataclass
class TaskResult:
    """What an executor hands back; the archive file belongs to the engine afterwards."""

    task_id: str
    lease_id: str
    status: TaskStatus
    exit_code: int = 0
    error: str = ""
    log_tail: bytes = b""
    archive: Path | None = None
    archive_sha256: str = ""
    archive_size: int = 0
    started_at: float = 0.0
    finished_at: float = 0.0
    cpu_seconds: float = 0.0
    max_memory_bytes: int = 0
    exclude_this_node: bool = False  # cancelled by the person here: not to be handed back here


@dataclass(frozen=True)
class _Fields:
    """A spec's fields as plain values, before the checks that every way in shares."""

    task_id: str
    lease_id: str
    kind: TaskKind | None
    name: str
    argv: tuple[str, ...]
    image: str
    source: str
    requirements: tuple[str, ...]
    env: dict[str, str]
    input_files: list[tuple[str, bytes, int]]  # (path, content, mode)
    input_archive: bytes
    resources: tuple[float, int, int, int]  # cpus, memory, disk, gpus
    timeout_seconds: int
    network: str
    result_path: str
    max_result_bytes: int
    attempt: int
    max_attempts: int


_T = TypeVar("_T")


_JSON_NAMES: dict[type, str] = {str: "a string", list: "a list", dict: "an object"}


def _get(data: dict[str, object], key: str, kind: type[_T], default: _T) -> _T:
    value = data.get(key, default)
    if not isinstance(value, kind):
        raise TaskSpecError(key, f"must be {_JSON_NAMES.get(kind, kind.__name__)}")
    return value


def _strings(data: dict[str, object], key: str) -> list[str]:
    values = _get(data, key, list, [])
    if not all(isinstance(v, str) for v in values):
        raise TaskSpecError(key, "must be a list of strings")
    return values


def _str_map(data: dict[str, object], key: str) -> dict[str, str]:
    values = _get(data, key, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in values.items()):
        raise TaskSpecError(key, "must map names to strings")
    return values


def _int(data: dict[str, object], key: str, field_name: str = "") -> int:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int):
        raise TaskSpecError(field_name or key, f"{key} must be an integer")
    return value


def _float(data: dict[str, object], key: str, field_name: str = "") -> float:
    value = data.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TaskSpecError(field_name or key, f"{key} must be a number")
    return float(value)


def _base64(text: str, field_name: str) -> bytes:
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise TaskSpecError(field_name, "is not base64") from None


def _input_file(entry: object) -> tuple[str, bytes, int]:
    if not isinstance(entry, dict):
        raise TaskSpecError("input_files", "each file must be a JSON object")
    path = _get(entry, "path", str, "")
    content = _base64(_get(entry, "content", str, ""), "input_files")
    return path, content, _int(entry, "mode", "input_files")


def image_reference_ok(image: str) -> bool:
    """Whether `image` is a well-formed image reference (name[:tag][@sha256:digest])."""
    return len(image) <= MAX_IMAGE_LEN and bool(_IMAGE_RE.match(image))


def _check_id(name: str, value: str) -> None:
    if not value:
        raise TaskSpecError(name, "is empty")
    if len(value) > MAX_ID_LEN or not _ID_RE.match(value):
        raise TaskSpecError(
            name, f"{value[:80]!r} must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ -"
        )


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
