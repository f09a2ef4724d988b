"""The store's records, refusals and password hashing: plain types shared by store and server."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import Resources, TaskKind, TaskSpec, TaskStatus

#: What a Python task can run on, and what a container task can run on.
KIND_CAPABILITIES: dict[TaskKind, frozenset[str]] = {
    TaskKind.PYTHON: frozenset({"process", "docker"}),
    TaskKind.CONTAINER: frozenset({"docker"}),
    # Besides an executor, these need the runner's capability (TaskNeed.needs).
    TaskKind.ML: frozenset({"process", "docker"}),
    TaskKind.DATA: frozenset({"process", "docker"}),
}
MAX_LOG_TAIL_BYTES = 64 * 1024
MAX_ERROR_CHARS = 4000

# scrypt with n=2**14, r=8 costs 16 MiB and tens of milliseconds: slow for guessing, fine for
# logins. The parameters are stored with each hash so they can be raised later.
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_LEN = 32


def now_ms() -> int:
    return int(time.time() * 1000)


class StoreError(HiveMindError):
    """A request the store refuses; `str()` is the reason given to the caller."""

    kind = ErrorKind.POOL_REFUSED
    title = "Request refused"


class DuplicateTask(StoreError):
    pass


class StaleLease(StoreError):
    def __init__(self, lease_id: str, task_id: str) -> None:
        super().__init__(f"lease {lease_id} is no longer current for task {task_id}")
        self.lease_id = lease_id
        self.task_id = task_id


class ResultMismatch(StoreError):
    """A report names a result digest that was not uploaded for its lease."""


class TokenExpired(StoreError):
    def __init__(self) -> None:
        super().__init__("token expired; log in again")


class NodeNotFound(StoreError):
    def __init__(self, node_id: str) -> None:
        super().__init__(f"node {node_id} is not registered")


class NodeOwnedByOther(StoreError):
    def __init__(self, node_id: str) -> None:
        super().__init__(f"node {node_id} is registered to another user")


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    owner: str
    capabilities: frozenset[str]
    last_seen_ms: int
    status: int
    status_message: str = ""  # why, when the node paused by its own rules ("on battery")


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    owner: str
    spec: pb.TaskSpec
    status: TaskStatus
    attempt: int
    max_attempts: int
    node_id: str
    lease_id: str
    lease_expires_ms: int
    cancel_requested: bool
    exit_code: int
    error: str
    log_tail: bytes
    result_sha256: str
    result_size: int
    submitted_ms: int
    started_ms: int
    finished_ms: int
    usage: dict[str, float]

    def to_info(self, *, with_contents: bool = True) -> pb.TaskInfo:
        """The wire view; without contents (inputs, source, log) for listings."""
        spec = pb.TaskSpec()
        spec.CopyFrom(self.spec)
        spec.attempt = self.attempt
        spec.lease_id = self.lease_id  # the current (or last) lease: lets a submitter correlate
        if not with_contents:
            for f in spec.input_files:
                f.content = b""
            spec.input_archive = b""
            spec.source = ""
        return pb.TaskInfo(
            spec=spec,
            status=self.status.to_proto(),
            attempt=self.attempt,
            node_id=self.node_id,
            exit_code=self.exit_code,
            error=self.error,
            log_tail=self.log_tail if with_contents else b"",
            result_sha256=self.result_sha256,
            result_size=self.result_size,
            submitted_unix_ms=self.submitted_ms,
            started_unix_ms=self.started_ms,
            finished_unix_ms=self.finished_ms,
            usage=pb.ResourceUsage(
                cpu_seconds=float(self.usage.get("cpu_seconds", 0.0)),
                max_memory_bytes=int(self.usage.get("max_memory_bytes", 0)),
                cpu_percent=float(self.usage.get("cpu_percent", 0.0)),
                memory_bytes=int(self.usage.get("memory_bytes", 0)),
            ),
            cancel_requested=self.cancel_requested,
        )


@dataclass(frozen=True)
class TaskNeed:
    """What a queued task asks of a worker: enough to pick a parked poll that can run it."""

    task_id: str
    kind: TaskKind
    resources: Resources
    timeout_seconds: int
    network: str
    needs: str = ""  # the runner capability of an ml or data task ("ml:scikit-learn", "data")

    @classmethod
    def of(cls, task: TaskSpec, task_id: str) -> TaskNeed:
        return cls(
            task_id=task_id,
            kind=task.kind,
            resources=task.resources,
            timeout_seconds=task.timeout_seconds,
            network=task.network or "none",
            needs=task.required_capability,
        )


@dataclass(frozen=True)
class Heartbeat:
    """One UpdateNodeStatus: noted in memory (heartbeats.Liveness), written by the next flush."""

    node_id: str
    status: int
    metrics: dict[str, float]
    lease_ids: Sequence[str] = ()
    usage: dict[str, dict[str, float]] = field(default_factory=dict)
    status_message: str = ""  # why, when the node paused by its own rules ("on battery")


@dataclass(frozen=True)
class HeartbeatOutcome:
    lost: list[str]  # leases the worker listed that the pool no longer honours
    cancels: list[str]  # the node's running tasks whose submitter asked to cancel


@dataclass(frozen=True)
class LivenessRow:
    """A node's last heartbeat, as a flush writes it."""

    node_id: str
    seen_ms: int
    status: int
    metrics_json: str  # the metrics, with the reason the node gave for its status, if any

    @classmethod
    def of(cls, beat: Heartbeat, seen_ms: int) -> LivenessRow:
        kept: dict[str, float | str] = dict(beat.metrics)
        if beat.status_message:
            kept["status_message"] = beat.status_message
        return cls(beat.node_id, seen_ms, beat.status, json.dumps(kept))


@dataclass(frozen=True)
class RenewalRow:
    """A lease renewed by a heartbeat, as a flush writes it: the expiry only ever grows."""

    lease_id: str
    node_id: str
    expires_ms: int
    usage: dict[str, float] | None


@dataclass(frozen=True)
class ReportOutcome:
    recorded: TaskStatus
    repeated: bool  # the same lease was reported before; nothing changed
    requeued: bool  # the worker gave the task back; it waits for another worker


@dataclass
class ExpiryOutcome:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.cancelled)


@dataclass(frozen=True)
class ResultInfo:
    task_id: str
    lease_id: str
    sha256: str
    size: int
    chunks: int


def hash_password(password: str, salt: bytes | None = None) -> str:
    """An scrypt hash in the stored form `scrypt$n$r$p$salt$hash`."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        dklen=_SCRYPT_LEN,
        maxmem=64 * 1024 * 1024,
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check; with no stored hash it still spends the same work."""
    if stored is None:
        hash_password(password)  # so an unknown user costs as much as a wrong password
        return False
    try:
        scheme, n, r, p, salt_hex, hash_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(salt_hex),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(hash_hex) // 2,
            maxmem=256 * 1024 * 1024,
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), hash_hex)


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def _task_record(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        task_id=str(row["task_id"]),
        owner=str(row["owner"]),
        spec=pb.TaskSpec.FromString(row["spec"]),
        status=TaskStatus(row["status"]),
        attempt=int(row["attempt"]),
        max_attempts=int(row["max_attempts"]),
        node_id=str(row["node_id"] or ""),
        lease_id=str(row["lease_id"] or ""),
        lease_expires_ms=int(row["lease_expires_ms"] or 0),
        cancel_requested=bool(row["cancel_requested"]),
        exit_code=int(row["exit_code"]),
        error=str(row["error"]),
        log_tail=bytes(row["log_tail"]),
        result_sha256=str(row["result_sha256"]),
        result_size=int(row["result_size"]),
        submitted_ms=int(row["submitted_ms"]),
        started_ms=int(row["started_ms"]),
        finished_ms=int(row["finished_ms"]),
        usage=json.loads(row["usage"]),
    )
