"""What the pool's services share: settings, counters, refusals, request checks, login throttle."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import grpc

from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.pool.store import (
    DuplicateTask,
    NodeNotFound,
    NodeOwnedByOther,
    ResultMismatch,
    StaleLease,
    StoreError,
    TokenExpired,
)
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import MAX_ID_LEN, GiB, MiB, TaskSpecError

log = logging.getLogger("hivemind_worker.pool")

MAX_MESSAGE_BYTES = 32 * MiB  # inline inputs up to 16 MiB, plus the rest of the spec
CHUNK_BYTES = 1 * MiB
MAX_MAX_ATTEMPTS = 100
MAX_TASKS_PER_POLL = 100
MAX_LIST_LIMIT = 1000
MAX_SUBMIT_BATCH = 1000  # specs in one SubmitTasks call
MAX_CAPABILITIES = 16
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["NodeManager"].full_name,
    pb.DESCRIPTOR.services_by_name["TaskQueue"].full_name,
)

ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}

Context = grpc.aio.ServicerContext[Any, Any]
_S = TypeVar("_S")
_Req = TypeVar("_Req")
_Resp = TypeVar("_Resp")


@dataclass
class PoolConfig:
    db_path: Path
    listen: str = "127.0.0.1:50051"
    heartbeat_interval: int = 10
    lease_timeout: int = 60
    max_wait: int = 30
    # The heartbeat interval stretches past heartbeat_interval to keep the pool's heartbeat rate
    # at or under this many a second (pace.py); the lease timeout stretches with it. 0: never.
    max_heartbeats_per_second: float = 100.0
    # Full garbage collections every this many seconds while serving, instead of CPython's
    # rule, which paused a large pool's loop for 0.5 s every few seconds
    # (collections_pace.py). 0: CPython's rule.
    full_collection_every: float = 300.0
    preload_images: tuple[str, ...] = ()  # told to workers at registration
    token_ttl: int = 7 * 86400
    default_max_attempts: int = 3
    reaper_interval: float = 1.0
    # TLS: both files (PEM) to serve TLS. Without them the pool serves plaintext, which it
    # does on a non-loopback address only when `insecure` says so.
    tls_cert: Path | None = None
    tls_key: Path | None = None
    insecure: bool = False
    # Uploads are spooled to files here (default: `<db file>.spool` next to the database);
    # at most this many bytes (declared sizes) may be in flight over all uploads at once.
    # It is also the largest result the pool takes: a task asking for a larger
    # max_result_bytes is refused at submit, and a larger upload with OUT_OF_RANGE (for
    # good, where a full pool answers RESOURCE_EXHAUSTED, "retry later").
    spool_dir: Path | None = None
    max_upload_bytes_in_flight: int = 2 * GiB
    # Logins: at most this many password checks (16 MiB of scrypt each) at once; after
    # `login_max_failures` failures within `login_failure_window` seconds for one username, or
    # from one peer address, logins for it are refused without a check for that long.
    login_concurrency: int = 2
    login_max_failures: int = 5
    login_failure_window: float = 60.0

    @property
    def spool_path(self) -> Path:
        return self.spool_dir or self.db_path.with_name(f"{self.db_path.name}.spool")


class RecentCounter(Counter[str]):
    """A Counter that keeps only the `maxlen` keys most recently added (insertion order)."""

    def __init__(self, maxlen: int = 10_000) -> None:
        super().__init__()
        self.maxlen = maxlen

    def __setitem__(self, key: str, value: int) -> None:
        if key not in self:
            while len(self) >= self.maxlen:
                del self[next(iter(self))]
        super().__setitem__(key, value)


@dataclass
class PoolStats:
    """In-memory counters since start, for tests and observability (lifetime totals: store).

    The per-lease counters count calls with a well-formed lease id, refused ones too, and
    keep the last 10,000 leases.
    """

    get_assigned_calls: Counter[str] = field(default_factory=Counter)  # by node id
    reports_by_lease: RecentCounter = field(default_factory=RecentCounter)
    uploads_by_lease: RecentCounter = field(default_factory=RecentCounter)
    refused_uploads_by_lease: RecentCounter = field(default_factory=RecentCounter)
    submitted: int = 0
    leased: int = 0
    requeued: int = 0
    expired_failed: int = 0
    stale_reports: int = 0
    uploads: int = 0


class PoolStartError(HiveMindError):
    """The pool cannot start (address in use, TLS files missing, plaintext refused...)."""

    kind = ErrorKind.BAD_SETTING
    title = "The pool cannot start"


class Refused(Exception):
    """A request refused with a gRPC status; raised by helpers, turned into an abort."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def invalid(field_name: str, reason: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {reason}")


def status_for(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status for an exception that is the caller's fault; None for a server bug."""
    code: grpc.StatusCode | None = None
    if isinstance(exc, Refused):
        return exc.code, exc.details
    if isinstance(exc, TaskSpecError):
        code = grpc.StatusCode.INVALID_ARGUMENT
    elif isinstance(exc, StaleLease | ResultMismatch):
        code = grpc.StatusCode.FAILED_PRECONDITION
    elif isinstance(exc, NodeNotFound):
        code = grpc.StatusCode.NOT_FOUND
    elif isinstance(exc, NodeOwnedByOther):
        code = grpc.StatusCode.PERMISSION_DENIED
    elif isinstance(exc, DuplicateTask):
        code = grpc.StatusCode.ALREADY_EXISTS
    elif isinstance(exc, TokenExpired):
        code = grpc.StatusCode.UNAUTHENTICATED
    return None if code is None else (code, str(exc))


def rpc(
    fn: Callable[[_S, _Req, Context], Awaitable[_Resp]],
) -> Callable[[_S, _Req, Context], Coroutine[Any, Any, _Resp]]:
    """Turn refusals raised inside a handler into gRPC statuses; log the rest as bugs."""

    @functools.wraps(fn)
    async def handler(self: _S, request: _Req, context: Context) -> _Resp:
        try:
            return await fn(self, request, context)
        except (Refused, TaskSpecError, StoreError) as exc:
            status = status_for(exc)
            if status is None:  # a StoreError nobody mapped: a bug, not bad input
                log.exception("%s failed", fn.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, f"pool error: {exc}")
            if isinstance(exc, StaleLease):
                log.info("%s refused: %s", fn.__name__, exc)
            await context.abort(*status)

    return handler


def require_id(field_name: str, value: str) -> str:
    if not value:
        raise invalid(field_name, "is empty")
    if len(value) > MAX_ID_LEN or not ID_RE.match(value):
        raise invalid(
            field_name, f"{value[:80]!r} must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ -"
        )
    return value


def require_sha256(field_name: str, value: str) -> str:
    if not SHA256_RE.match(value):
        raise invalid(field_name, f"{value[:80]!r} is not a lowercase hex sha256 digest")
    return value


def usage_dict(usage: pb.ResourceUsage) -> dict[str, float]:
    return {
        "cpu_seconds": usage.cpu_seconds,
        "max_memory_bytes": usage.max_memory_bytes,
        "cpu_percent": usage.cpu_percent,
        "memory_bytes": usage.memory_bytes,
    }


def split_host_port(address: str) -> tuple[str, int]:
    """'host:port' or '[v6]:port' into its parts; ValueError naming the problem."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, int(port)


def peer_host(peer: str) -> str:
    """'ipv4:1.2.3.4:5678' -> '1.2.3.4', 'ipv6:[::1]:5678' -> '[::1]'; others as they are."""
    kind, _, rest = peer.partition(":")
    if kind in ("ipv4", "ipv6"):
        host, sep, port = rest.rpartition(":")
        if sep and port.isdigit():
            return host
    return peer


class LoginThrottle:
    """Failed logins by key (a username or a peer address) in a sliding window.

    After `limit` failures within `window` seconds a key is blocked for `window` seconds:
    logins for it are refused before any password check. Only failures that ran a password
    check are counted, so the entries grow at most as fast as the checks can run.
    """

    def __init__(
        self, limit: int, window: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.limit = max(limit, 1)
        self.window = window
        self._clock = clock
        self._failures: dict[str, deque[float]] = {}
        self._blocked: dict[str, float] = {}

    def retry_after(self, keys: Iterable[str]) -> float:
        """Seconds until every key may try again; 0 when none is blocked."""
        now = self._clock()
        wait = 0.0
        for key in keys:
            until = self._blocked.get(key)
            if until is None:
                continue
            if until <= now:
                del self._blocked[key]
            else:
                wait = max(wait, until - now)
        return wait

    def failed(self, keys: Iterable[str]) -> None:
        now = self._clock()
        for key in keys:
            times = self._failures.setdefault(key, deque())
            times.append(now)
            while times and times[0] <= now - self.window:
                times.popleft()
            if len(times) >= self.limit:
                self._blocked[key] = now + self.window
                del self._failures[key]
        if len(self._failures) > 10_000:
            self._sweep(now)

    def succeeded(self, key: str) -> None:
        self._failures.pop(key, None)

    def _sweep(self, now: float) -> None:
        stale = [k for k, t in self._failures.items() if not t or t[-1] <= now - self.window]
        for key in stale:
            del self._failures[key]
        for key in [k for k, until in self._blocked.items() if until <= now]:
            del self._blocked[key]
