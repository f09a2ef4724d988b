"""TaskSpec and TaskResult domain objects, validated from the wire before anything runs."""

from __future__ import annotations

import base64
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path, PurePosixPath

from hivemind_worker import task_params
from hivemind_worker.protocol import nodepool_pb2 as pb

# Re-exported: every layer imports these two from here (mypy needs the `as` to see that).
from hivemind_worker.spec_checks import TaskSpecError as TaskSpecError  # noqa: PLC0414
from hivemind_worker.spec_checks import (
    json_base64,
    json_float,
    json_get,
    json_input_file,
    json_int,
    json_str_map,
    json_strings,
)
from hivemind_worker.spec_checks import safe_relative_path as safe_relative_path  # noqa: PLC0414
from hivemind_worker.task_params import DataParams, MlParams

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


class TaskKind(StrEnum):
    CONTAINER = "container"
    PYTHON = "python"
    ML = "ml"  # the ml and data kinds run the worker's own runners (task_params.py)
    DATA = "data"

    @property
    def runs_a_runner(self) -> bool:
        return self in (TaskKind.ML, TaskKind.DATA)


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
_KIND_FROM_PB = {
    pb.TASK_KIND_CONTAINER: TaskKind.CONTAINER,
    pb.TASK_KIND_PYTHON: TaskKind.PYTHON,
    pb.TASK_KIND_ML: TaskKind.ML,
    pb.TASK_KIND_DATA: TaskKind.DATA,
}
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
    ml: MlParams | None = None
    data: DataParams | None = None
    # Set by the worker only (never on the wire): the runner environment a python task made
    # from an ml or data task runs in (engine/runners).
    environment: str = ""

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
                ml=msg.ml if msg.HasField("ml") else None,
                data=msg.data if msg.HasField("data") else None,
                environment="",
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
        kind_name = json_get(data, "kind", str, "")
        files = json_get(data, "input_files", list, [])
        resources = json_get(data, "resources", dict, {})
        return cls._validated(
            _Fields(
                task_id=json_get(data, "task_id", str, ""),
                lease_id=json_get(data, "lease_id", str, ""),
                kind=TaskKind(kind_name) if kind_name in tuple(TaskKind) else None,
                name=json_get(data, "name", str, ""),
                argv=tuple(json_strings(data, "argv")),
                image=json_get(data, "image", str, ""),
                source=json_get(data, "source", str, ""),
                requirements=tuple(json_strings(data, "requirements")),
                env=json_str_map(data, "env"),
                input_files=[json_input_file(f) for f in files],
                input_archive=json_base64(
                    json_get(data, "input_archive", str, ""), "input_archive"
                ),
                resources=(
                    json_float(resources, "cpus", "resources"),
                    json_int(resources, "memory_bytes", "resources"),
                    json_int(resources, "disk_bytes", "resources"),
                    json_int(resources, "gpus", "resources"),
                ),
                timeout_seconds=json_int(data, "timeout_seconds"),
                network=json_get(data, "network", str, ""),
                result_path=json_get(data, "result_path", str, ""),
                max_result_bytes=json_int(data, "max_result_bytes"),
                attempt=json_int(data, "attempt"),
                max_attempts=json_int(data, "max_attempts"),
                ml=task_params.ml_from_dict(data.get("ml")),
                data=task_params.data_from_dict(data.get("data")),
                environment=json_get(data, "environment", str, ""),
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
            "ml": task_params.params_to_dict(self.ml),
            "data": task_params.params_to_dict(self.data),
            "environment": self.environment,
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
            raise TaskSpecError("kind", "must be 'container', 'python', 'ml' or 'data'")
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
        elif kind is TaskKind.PYTHON:
            if not source.strip():
                raise TaskSpecError("source", "a python task needs source code")
            if len(source.encode()) > MAX_SOURCE_BYTES:
                raise TaskSpecError("source", f"larger than {MAX_SOURCE_BYTES} bytes")
            if "\x00" in source:
                raise TaskSpecError("source", "contains a NUL character")
        elif image or source:  # nothing of the submitter's runs in a runner kind
            raise TaskSpecError(
                "image" if image else "source", f"{kind.value} tasks run the worker's own runner"
            )
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
        ml, data = task_params.checked(
            kind.value, msg.ml, msg.data, requirements=requirements, env=env, argv=argv,
            input_paths=seen,
            has_archive=bool(msg.input_archive),
        )  # fmt: skip

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
            ml=ml,
            data=data,
            environment=task_params.check_environment(msg.environment),
        )

    @property
    def required_capability(self) -> str:
        """The capability a worker must advertise, besides its executor's, to run this task."""
        if self.ml is not None:
            return f"ml:{self.ml.framework}"
        return "data" if self.data is not None else ""

    def to_proto(self) -> pb.TaskSpec:
        return pb.TaskSpec(
            ml=self.ml.to_proto() if self.ml is not None else None,
            data=self.data.to_proto() if self.data is not None else None,
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
    ml: pb.MlParams | None  # as on the wire; task_params checks them
    data: pb.DataParams | None
    environment: str


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
