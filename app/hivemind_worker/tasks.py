"""TaskSpec and TaskResult domain objects, validated from the wire before anything runs."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath

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
        task_id = msg.task_id
        if task_id or require_id:
            _check_id("task_id", task_id)
        if require_lease or msg.lease_id:
            _check_id("lease_id", msg.lease_id)
        kind = _KIND_FROM_PB.get(msg.kind)
        if kind is None:
            raise TaskSpecError("kind", "must be 'container' or 'python'")
        if len(msg.name) > MAX_NAME_LEN:
            raise TaskSpecError("name", f"longer than {MAX_NAME_LEN} characters")
        if any(ord(c) < 32 for c in msg.name):
            raise TaskSpecError("name", "contains control characters")

        argv = tuple(msg.argv)
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

        requirements = tuple(msg.requirements)
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
        for f in msg.input_files:
            path = safe_relative_path(f.path, "input_files")
            if path in seen:
                raise TaskSpecError("input_files", f"{f.path!r} is given twice")
            seen.add(path)
            mode = f.mode or 0o644
            if mode & ~0o777:
                raise TaskSpecError("input_files", f"{f.path!r} has mode {oct(mode)}")
            total += len(f.content)
            files.append(InputFile(path, f.content, mode))
        if total > MAX_INPUT_BYTES:
            raise TaskSpecError("input_files", f"inputs larger than {MAX_INPUT_BYTES} bytes")

        res = msg.resources
        if res.cpus < 0 or res.memory_bytes < 0 or res.disk_bytes < 0 or res.gpus < 0:
            raise TaskSpecError("resources", "negative values are not allowed")
        if not (res.cpus <= MAX_CPUS):  # also catches NaN
            raise TaskSpecError("resources", f"cpus must be at most {MAX_CPUS:g}")
        if res.memory_bytes > MAX_MEMORY_BYTES or res.disk_bytes > MAX_DISK_BYTES:
            raise TaskSpecError("resources", "memory or disk request is beyond any machine")
        if res.gpus > MAX_GPUS:
            raise TaskSpecError("resources", f"gpus must be at most {MAX_GPUS}")
        resources = Resources(
            res.cpus or DEFAULT_CPUS,
            res.memory_bytes or DEFAULT_MEMORY_BYTES,
            res.disk_bytes or DEFAULT_DISK_BYTES,
            res.gpus,
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
