"""The reference Node Pool: NodeManager, TaskQueue and health services over the SQLite store."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import logging
import math
import re
import sqlite3
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, TypeVar

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from hivemind_worker import __version__
from hivemind_worker.engine.pool_client import is_loopback_host
from hivemind_worker.engine.tasks import (
    MAX_ID_LEN,
    GiB,
    MiB,
    Resources,
    TaskSpec,
    TaskSpecError,
    TaskStatus,
)
from hivemind_worker.pool.store import (
    DuplicateTask,
    NodeNotFound,
    NodeOwnedByOther,
    PoolStore,
    ResultMismatch,
    StaleLease,
    StoreError,
    TokenExpired,
    now_ms,
    verify_password,
)
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc

log = logging.getLogger("hivemind_worker.pool")

MAX_MESSAGE_BYTES = 32 * MiB  # inline inputs up to 16 MiB, plus the rest of the spec
CHUNK_BYTES = 1 * MiB
MAX_MAX_ATTEMPTS = 100
MAX_TASKS_PER_POLL = 100
MAX_LIST_LIMIT = 1000
MAX_CAPABILITIES = 16
SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["NodeManager"].full_name,
    pb.DESCRIPTOR.services_by_name["TaskQueue"].full_name,
)

_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
_WILDCARD_HOSTS = {"", "0.0.0.0", "::", "[::]"}

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


class PoolStartError(RuntimeError):
    """The pool cannot start (address in use, TLS files missing, plaintext refused...)."""


class _Refused(Exception):
    """A request refused with a gRPC status; raised by helpers, turned into an abort."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


def _invalid(field_name: str, reason: str) -> _Refused:
    return _Refused(grpc.StatusCode.INVALID_ARGUMENT, f"{field_name}: {reason}")


def _status_for(exc: Exception) -> tuple[grpc.StatusCode, str] | None:
    """The gRPC status for an exception that is the caller's fault; None for a server bug."""
    code: grpc.StatusCode | None = None
    if isinstance(exc, _Refused):
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


def _rpc(
    fn: Callable[[_S, _Req, Context], Awaitable[_Resp]],
) -> Callable[[_S, _Req, Context], Coroutine[Any, Any, _Resp]]:
    """Turn refusals raised inside a handler into gRPC statuses; log the rest as bugs."""

    @functools.wraps(fn)
    async def handler(self: _S, request: _Req, context: Context) -> _Resp:
        try:
            return await fn(self, request, context)
        except (_Refused, TaskSpecError, StoreError) as exc:
            status = _status_for(exc)
            if status is None:  # a StoreError nobody mapped: a bug, not bad input
                log.exception("%s failed", fn.__name__)
                await context.abort(grpc.StatusCode.INTERNAL, f"pool error: {exc}")
            if isinstance(exc, StaleLease):
                log.info("%s refused: %s", fn.__name__, exc)
            await context.abort(*status)

    return handler


def _require_id(field_name: str, value: str) -> str:
    if not value:
        raise _invalid(field_name, "is empty")
    if len(value) > MAX_ID_LEN or not _ID_RE.match(value):
        raise _invalid(
            field_name, f"{value[:80]!r} must be 1-{MAX_ID_LEN} characters of A-Z a-z 0-9 . _ -"
        )
    return value


def _require_sha256(field_name: str, value: str) -> str:
    if not _SHA256_RE.match(value):
        raise _invalid(field_name, f"{value[:80]!r} is not a lowercase hex sha256 digest")
    return value


def _usage_dict(usage: pb.ResourceUsage) -> dict[str, float]:
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


def _peer_host(peer: str) -> str:
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


@dataclass
class _Upload:
    """One upload in flight: `stop` asks it to give way, `finished` says it has."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


async def _until(
    messages: AsyncIterator[pb.UploadTaskResultRequest], stop: asyncio.Event
) -> AsyncIterator[pb.UploadTaskResultRequest]:
    """The messages, until `stop` is set: then ABORTED, even while waiting for the next one."""
    iterator = aiter(messages)
    stopped = asyncio.ensure_future(stop.wait())
    try:
        while True:
            following = asyncio.ensure_future(anext(iterator))
            await asyncio.wait({following, stopped}, return_when=asyncio.FIRST_COMPLETED)
            if stopped.done():
                following.cancel()
                raise _Refused(
                    grpc.StatusCode.ABORTED, "superseded by a newer upload for this lease"
                )
            try:
                yield following.result()
            except StopAsyncIteration:
                return
    finally:
        stopped.cancel()


class _Core:
    """What both services share: config, store, stats, auth and the long-poll wake-up."""

    def __init__(self, config: PoolConfig, store: PoolStore, stats: PoolStats) -> None:
        self.config = config
        self.store = store
        self.stats = stats
        self._wakeup = asyncio.Event()
        self.login_slots = asyncio.Semaphore(max(config.login_concurrency, 1))
        self.login_throttle = LoginThrottle(config.login_max_failures, config.login_failure_window)
        self.spool = config.spool_path
        # The upload in flight for each lease. A new one from the lease holder supersedes it:
        # a worker retries when its connection died mid-upload, often before this pool has
        # noticed the death, and only the lease holder can upload for the lease.
        self.uploading: dict[str, _Upload] = {}
        self.upload_bytes = 0  # declared sizes of the uploads in flight
        # A test seam: awaited before each chunk of an upload is moved into the database.
        self.before_result_chunk: Callable[[str, int], Awaitable[None]] | None = None

    def notify(self) -> None:
        """Wake every long-poll waiting for work; each then tries to lease again."""
        self._wakeup.set()
        self._wakeup = asyncio.Event()

    @property
    def wakeup(self) -> asyncio.Event:
        return self._wakeup

    def user(self, context: Context) -> str:
        """The caller's username from `authorization: Bearer <token>`, or _Refused."""
        value: str | bytes | None = None
        for key, val in context.invocation_metadata() or ():
            if key == "authorization":
                value = val
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if not value:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'"
            )
        username = self.store.token_user(token.strip())  # TokenExpired maps to UNAUTHENTICATED
        if username is None:
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "unknown token; log in again")
        return username


class NodeManagerService(pb_grpc.NodeManagerServicer):
    """The worker-facing service: login, registration, heartbeats, leases, reports, uploads."""

    def __init__(self, core: _Core) -> None:
        self._core = core

    @_rpc
    async def Login(self, request: pb.LoginRequest, context: Context) -> pb.LoginResponse:
        if not request.username:
            raise _invalid("username", "is empty")
        core = self._core
        store = core.store
        user_key = f"user:{request.username[:MAX_ID_LEN]}"
        keys = (user_key, f"peer:{_peer_host(context.peer() or '')}")
        throttle = core.login_throttle
        self._refuse_if_throttled(keys)
        # scrypt costs 16 MiB and tens of milliseconds and releases the GIL: keep it off the
        # loop, and run only a few at once.
        async with core.login_slots:
            self._refuse_if_throttled(keys)  # failures recorded while this call waited
            stored = store.password_hash(request.username)
            ok = await asyncio.to_thread(verify_password, request.password, stored)
        if not ok:
            throttle.failed(keys)
            log.info("login refused for %r from %s", request.username[:80], context.peer())
            raise _Refused(grpc.StatusCode.UNAUTHENTICATED, "wrong username or password")
        throttle.succeeded(user_key)
        token, expires = store.issue_token(request.username, self._core.config.token_ttl)
        log.info("login: %s", request.username)
        return pb.LoginResponse(token=token, expires_unix_ms=expires, username=request.username)

    def _refuse_if_throttled(self, keys: Iterable[str]) -> None:
        wait = self._core.login_throttle.retry_after(keys)
        if wait > 0:
            raise _Refused(
                grpc.StatusCode.UNAUTHENTICATED,
                f"too many failed logins; try again in {math.ceil(wait)} s",
            )

    @_rpc
    async def RegisterNode(
        self, request: pb.RegisterNodeRequest, context: Context
    ) -> pb.RegisterNodeResponse:
        user = self._core.user(context)
        node_id = _require_id("node_id", request.node_id)
        caps = list(request.capabilities)
        if len(caps) > MAX_CAPABILITIES or any(not c or len(c) > 32 for c in caps):
            raise _invalid("capabilities", f"at most {MAX_CAPABILITIES} names of 1-32 characters")
        self._core.store.upsert_node(node_id, user, request, caps)
        config = self._core.config
        log.info("node %s registered by %s (capabilities %s)", node_id, user, ",".join(caps))
        return pb.RegisterNodeResponse(
            accepted=True,
            message=f"node {node_id} registered for {user}",
            heartbeat_interval_seconds=config.heartbeat_interval,
            lease_timeout_seconds=config.lease_timeout,
            max_wait_seconds=config.max_wait,
            preload_images=list(config.preload_images),
        )

    @_rpc
    async def UpdateNodeStatus(
        self, request: pb.UpdateNodeStatusRequest, context: Context
    ) -> pb.UpdateNodeStatusResponse:
        user = self._core.user(context)
        node_id = _require_id("node_id", request.node_id)
        store = self._core.store
        store.get_node(node_id, user)
        lease_ids: list[str] = []
        usage: dict[str, dict[str, float]] = {}
        for running in request.running:
            lease_id = _require_id("running.lease_id", running.lease_id)
            lease_ids.append(lease_id)
            if running.HasField("usage"):
                usage[lease_id] = _usage_dict(running.usage)
        metrics = request.metrics
        store.record_heartbeat(
            node_id,
            int(request.status),
            {
                "cpu_percent": metrics.cpu_percent,
                "memory_used_bytes": metrics.memory_used_bytes,
                "memory_total_bytes": metrics.memory_total_bytes,
                "disk_free_bytes": metrics.disk_free_bytes,
            },
            request.status_message[:200],
        )
        lost = store.renew(node_id, lease_ids, self._core.config.lease_timeout, usage)
        if lost:
            log.info("node %s holds leases the pool no longer honours: %s", node_id, lost)
        cancels = store.cancels_for(node_id)
        return pb.UpdateNodeStatusResponse(
            ack=True, cancel_task_ids=cancels, drain=False, lost_lease_ids=lost
        )

    @_rpc
    async def GetAssignedTasks(
        self, request: pb.GetAssignedTasksRequest, context: Context
    ) -> pb.GetAssignedTasksResponse:
        core = self._core
        user = core.user(context)
        node_id = _require_id("node_id", request.node_id)
        node = core.store.get_node(node_id, user)
        core.stats.get_assigned_calls[node_id] += 1
        free = Resources.from_proto(request.free)
        cpus_ok = math.isfinite(free.cpus) and free.cpus >= 0
        if not cpus_ok or min(free.memory_bytes, free.disk_bytes, free.gpus) < 0:
            raise _invalid("free", "resources must be finite and not negative")
        max_tasks = min(request.max_tasks or 1, MAX_TASKS_PER_POLL)
        capabilities = set(request.capabilities) or set(node.capabilities)
        wait = float(min(request.wait_seconds, core.config.max_wait))
        # Answer a little before the caller's deadline: a lease handed out in a response the
        # caller has stopped waiting for would sit unused until it expired.
        remaining = context.time_remaining()
        if remaining is not None and math.isfinite(remaining):
            wait = min(wait, max(remaining - 1.0, 0.0))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            wakeup = core.wakeup  # taken before trying, so a notify in between is not missed
            specs = core.store.lease_tasks(
                node_id,
                free,
                max_tasks,
                capabilities,
                lease_seconds=core.config.lease_timeout,
                max_timeout_seconds=request.max_timeout_seconds,
                networks=frozenset(request.networks) | {"none"},
            )
            if specs:
                core.stats.leased += len(specs)
                for spec in specs:
                    log.info(
                        "leased task %s (attempt %d) to node %s as lease %s",
                        spec.task_id,
                        spec.attempt,
                        node_id,
                        spec.lease_id,
                    )
                return pb.GetAssignedTasksResponse(tasks=specs)
            left = deadline - loop.time()
            if left <= 0:
                return pb.GetAssignedTasksResponse()
            # A client that cancels its call cancels this task: CancelledError ends the wait.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wakeup.wait(), left)

    @_rpc
    async def ReportTaskResult(
        self, request: pb.ReportTaskResultRequest, context: Context
    ) -> pb.ReportTaskResultResponse:
        core = self._core
        user = core.user(context)
        node_id = _require_id("node_id", request.node_id)
        task_id = _require_id("task_id", request.task_id)
        lease_id = _require_id("lease_id", request.lease_id)
        core.stats.reports_by_lease[lease_id] += 1
        status = TaskStatus.from_proto(request.status)
        if not status.is_final:
            raise _invalid("status", f"must be a final status, not {status.value}")
        if request.result_sha256:
            _require_sha256("result_sha256", request.result_sha256)
        if request.result_size < 0:
            raise _invalid("result_size", "is negative")
        core.store.get_node(node_id, user)
        try:
            outcome = core.store.record_report(
                node_id=node_id,
                task_id=task_id,
                lease_id=lease_id,
                status=status,
                exit_code=request.exit_code,
                error=request.error,
                log_tail=request.log_tail,
                result_sha256=request.result_sha256,
                result_size=request.result_size,
                started_ms=max(request.started_unix_ms, 0),
                finished_ms=max(request.finished_unix_ms, 0),
                usage=_usage_dict(request.usage) if request.HasField("usage") else None,
            )
        except StaleLease:
            core.stats.stale_reports += 1
            core.store.count_stale_report()
            raise
        if outcome.repeated:
            log.info("repeated report for lease %s acknowledged again", lease_id)
        else:
            log.info(
                "task %s reported %s by node %s (recorded %s)",
                task_id,
                status.value,
                node_id,
                outcome.recorded.value,
            )
        if outcome.requeued:
            core.stats.requeued += 1
            core.notify()
        return pb.ReportTaskResultResponse(ack=True, recorded_status=outcome.recorded.to_proto())

    @_rpc
    async def UploadTaskResult(
        self, request_iterator: AsyncIterator[pb.UploadTaskResultRequest], context: Context
    ) -> pb.UploadTaskResultResponse:
        core = self._core
        user = core.user(context)
        messages = aiter(request_iterator)
        first = await anext(messages, None)
        if first is None or first.WhichOneof("part") != "header":
            raise _invalid("header", "the first message must be an UploadHeader")
        head = first.header
        node_id = _require_id("header.node_id", head.node_id)
        task_id = _require_id("header.task_id", head.task_id)
        lease_id = _require_id("header.lease_id", head.lease_id)
        core.stats.uploads_by_lease[lease_id] += 1
        try:
            return await self._upload(user, node_id, task_id, lease_id, head, messages)
        except (_Refused, TaskSpecError, StoreError):
            # A client that cancels ends the request stream early, which looks like a short
            # upload here: that is not a refusal the client ever sees.
            if not context.cancelled():
                core.stats.refused_uploads_by_lease[lease_id] += 1
            raise

    async def _upload(
        self,
        user: str,
        node_id: str,
        task_id: str,
        lease_id: str,
        head: pb.UploadHeader,
        messages: AsyncIterator[pb.UploadTaskResultRequest],
    ) -> pb.UploadTaskResultResponse:
        core = self._core
        expected_sha = _require_sha256("header.sha256", head.sha256)
        total = head.total_size
        if total < 0:
            raise _invalid("header.total_size", "is negative")
        core.store.get_node(node_id, user)
        task = core.store.get_task(task_id)
        if task is None or not core.store.lease_is_current(task_id, lease_id, node_id):
            raise StaleLease(lease_id, task_id)
        limit = task.spec.max_result_bytes
        if total > limit:
            raise _invalid(
                "header.total_size",
                f"{total} bytes is more than the task's max_result_bytes ({limit})",
            )
        previous = core.uploading.get(lease_id)
        if previous is not None:
            log.info("upload for lease %s supersedes the one still in flight", lease_id)
            previous.stop.set()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(previous.finished.wait(), 10)
            if lease_id in core.uploading:
                raise _Refused(
                    grpc.StatusCode.ABORTED, "an upload for this lease is still being stopped"
                )
        cap = core.config.max_upload_bytes_in_flight
        if total > cap:
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{total} bytes is more than this pool receives at once ({cap})",
            )
        if core.upload_bytes + total > cap:
            raise _Refused(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"the pool is receiving {core.upload_bytes} bytes of other uploads and takes "
                f"at most {cap} at once; {total} more do not fit now: retry later",
            )
        # Reserved until this call ends, however it ends (a client cancel included).
        me = _Upload()
        core.uploading[lease_id] = me
        core.upload_bytes += total
        path = core.spool / f"upload-{uuid.uuid4().hex}.part"
        spool: IO[bytes] | None = None
        try:
            # Creating the file is quick; doing it here means no thread can create it after
            # the cleanup below ran. Writes, which may be slow, go to a thread.
            spool = path.open("xb+")
            size, digest = await self._receive(spool, messages, total, me.stop)
            # Also a moment for a client's cancel, which ends the stream like this, to arrive.
            await asyncio.to_thread(spool.flush)
            if size != total:
                raise _Refused(
                    grpc.StatusCode.DATA_LOSS,
                    f"received {size} bytes but header.total_size is {total}",
                )
            if digest != expected_sha:
                raise _Refused(
                    grpc.StatusCode.DATA_LOSS,
                    f"received data has sha256 {digest}, not header.sha256 {expected_sha}",
                )
            await self._store_spooled(spool, task_id, lease_id, node_id, digest, size)
        except OSError as exc:  # the spool folder is full or gone: not the caller's fault
            log.exception("upload for lease %s: spool file %s failed", lease_id, path)
            raise _Refused(
                grpc.StatusCode.INTERNAL, f"the pool cannot spool the upload: {exc.strerror}"
            ) from None
        finally:
            if core.uploading.get(lease_id) is me:
                del core.uploading[lease_id]
            me.finished.set()
            core.upload_bytes -= total
            try:
                if spool is not None:
                    spool.close()  # waits for a write still running in its thread, if any
            finally:
                path.unlink(missing_ok=True)
        core.stats.uploads += 1
        log.info("stored result of task %s (%d bytes, lease %s)", task_id, size, lease_id)
        return pb.UploadTaskResultResponse(sha256=digest, size=size)

    @staticmethod
    async def _receive(
        spool: IO[bytes],
        messages: AsyncIterator[pb.UploadTaskResultRequest],
        total: int,
        stop: asyncio.Event,
    ) -> tuple[int, str]:
        """Write the data messages to `spool`; their size and sha256. `stop`: superseded."""
        hasher = hashlib.sha256()

        def write(data: bytes) -> None:
            spool.write(data)
            hasher.update(data)  # releases the GIL for big buffers, like the write

        size = 0
        async for msg in _until(messages, stop):
            if msg.WhichOneof("part") != "data":
                raise _invalid("header", "sent more than once; only the first message is one")
            data = msg.data
            if len(data) > CHUNK_BYTES:
                raise _invalid("data", f"a chunk of {len(data)} bytes is larger than 1 MiB")
            size += len(data)
            if size > total:
                raise _invalid("data", f"more than header.total_size ({total}) bytes were sent")
            if data:
                await asyncio.to_thread(write, data)
        return size, hasher.hexdigest()

    async def _store_spooled(
        self, spool: IO[bytes], task_id: str, lease_id: str, node_id: str, digest: str, size: int
    ) -> None:
        """Move the spooled upload into the store chunk by chunk, then commit it as the result.

        Each chunk is read in a thread and written in its own short transaction, with the loop
        free in between; the commit re-checks the lease in the transaction that swaps the
        result in, so a lease lost meanwhile is refused.
        """
        core = self._core
        store = core.store

        def read() -> bytes:
            return spool.read(CHUNK_BYTES)

        if not store.lease_is_current(task_id, lease_id, node_id):
            raise StaleLease(lease_id, task_id)  # lost while receiving: store nothing
        await asyncio.to_thread(spool.seek, 0)
        blob_id = store.new_blob()
        seq = 0
        try:
            while True:
                data = await asyncio.to_thread(read)
                if not data:
                    break
                if core.before_result_chunk is not None:
                    await core.before_result_chunk(lease_id, seq)
                store.add_blob_chunk(blob_id, seq, data)
                seq += 1
        except BaseException:
            store.discard_blob(blob_id)
            raise
        store.commit_result(
            task_id, lease_id, node_id, sha256=digest, size=size, blob_id=blob_id, chunks=seq
        )

    async def Ping(self, request: pb.PingRequest, context: Context) -> pb.PingResponse:
        return pb.PingResponse(server_version=__version__, server_time_unix_ms=now_ms())


class TaskQueueService(pb_grpc.TaskQueueServicer):
    """The submitter-facing service; each user sees only their own tasks."""

    def __init__(self, core: _Core) -> None:
        self._core = core

    @_rpc
    async def SubmitTask(
        self, request: pb.SubmitTaskRequest, context: Context
    ) -> pb.SubmitTaskResponse:
        core = self._core
        user = core.user(context)
        if not request.HasField("spec"):
            raise _invalid("spec", "is missing")
        task = TaskSpec.from_proto(request.spec, require_id=False)
        if task.max_attempts > MAX_MAX_ATTEMPTS:
            raise _invalid("max_attempts", f"must be at most {MAX_MAX_ATTEMPTS}")
        task_id = core.store.submit(task, user)
        core.stats.submitted += 1
        log.info("task %s (%s) submitted by %s", task_id, task.kind.value, user)
        core.notify()
        return pb.SubmitTaskResponse(task_id=task_id)

    @_rpc
    async def GetTask(self, request: pb.GetTaskRequest, context: Context) -> pb.TaskInfo:
        user = self._core.user(context)
        task_id = _require_id("task_id", request.task_id)
        task = self._core.store.get_task(task_id, owner=user)
        if task is None:
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
        return task.to_info()

    @_rpc
    async def ListTasks(
        self, request: pb.ListTasksRequest, context: Context
    ) -> pb.ListTasksResponse:
        user = self._core.user(context)
        try:
            statuses = [TaskStatus.from_proto(s) for s in request.statuses]
        except TaskSpecError as exc:
            raise _invalid("statuses", exc.reason) from None
        limit = min(request.limit or 100, MAX_LIST_LIMIT)
        tasks = self._core.store.list_tasks(statuses, limit, owner=user)
        return pb.ListTasksResponse(tasks=[t.to_info(with_contents=False) for t in tasks])

    @_rpc
    async def CancelTask(
        self, request: pb.CancelTaskRequest, context: Context
    ) -> pb.CancelTaskResponse:
        user = self._core.user(context)
        task_id = _require_id("task_id", request.task_id)
        reason = request.reason[:500]
        status = self._core.store.request_cancel(task_id, user, reason)
        if status is None:
            raise _Refused(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
        log.info("cancel of task %s requested by %s: now %s", task_id, user, status.value)
        self._core.notify()
        return pb.CancelTaskResponse(status=status.to_proto())

    async def DownloadTaskResult(
        self, request: pb.DownloadTaskResultRequest, context: Context
    ) -> AsyncIterator[pb.ResultChunk]:
        store = self._core.store
        try:
            user = self._core.user(context)
            task_id = _require_id("task_id", request.task_id)
            if store.get_task(task_id, owner=user) is None:
                raise _Refused(grpc.StatusCode.NOT_FOUND, f"task {task_id} not found")
            info = store.get_result(task_id)
            if info is None:
                raise _Refused(grpc.StatusCode.NOT_FOUND, f"task {task_id} has no result")
        except (_Refused, StoreError) as exc:
            status = _status_for(exc) or (grpc.StatusCode.INTERNAL, str(exc))
            await context.abort(*status)
        if info.chunks == 0:
            yield pb.ResultChunk(data=b"", total_size=0, sha256=info.sha256)
        for seq in range(info.chunks):
            data = store.result_chunk(task_id, seq)
            if seq == 0:
                yield pb.ResultChunk(data=data, total_size=info.size, sha256=info.sha256)
            else:
                yield pb.ResultChunk(data=data)


def _prepare_spool(spool: Path) -> None:
    """Create the spool folder and remove uploads a previous run left behind (a crash)."""
    spool.mkdir(parents=True, exist_ok=True)
    for leftover in spool.glob("upload-*.part"):
        leftover.unlink(missing_ok=True)


class PoolServer:
    """A running reference pool: gRPC server, SQLite store and lease reaper on one loop."""

    def __init__(self, config: PoolConfig) -> None:
        self.config = config
        self.stats = PoolStats()
        self._store: PoolStore | None = None
        self._server: grpc.aio.Server | None = None
        self._health: Any = None
        self._core: _Core | None = None
        self._reaper: asyncio.Task[None] | None = None
        self._port = 0

    @property
    def store(self) -> PoolStore:
        if self._store is None:
            raise RuntimeError("the pool is not started")
        return self._store

    @property
    def port(self) -> int:
        return self._port

    @property
    def address(self) -> str:
        """Where a client on this machine reaches the pool, e.g. '127.0.0.1:50051'."""
        host, _ = split_host_port(self.config.listen)
        if host in _WILDCARD_HOSTS:
            host = "127.0.0.1"
        return f"{host}:{self._port}"

    async def start(self) -> int:
        """Open the store, bind, serve and start the reaper; return the bound port."""
        config = self.config
        try:
            host, _ = split_host_port(config.listen)
        except ValueError as exc:
            raise PoolStartError(f"listen address {exc}") from None
        credentials: grpc.ServerCredentials | None = None
        if config.tls_cert or config.tls_key:
            if not (config.tls_cert and config.tls_key):
                raise PoolStartError("TLS needs both a certificate and a key file")
            try:
                credentials = grpc.ssl_server_credentials(
                    [(config.tls_key.read_bytes(), config.tls_cert.read_bytes())]
                )
            except OSError as exc:
                raise PoolStartError(f"cannot read TLS files: {exc}") from None
        elif not is_loopback_host(host) and not config.insecure:
            raise PoolStartError(
                f"refusing to serve plaintext on {config.listen}, which is not a loopback "
                "address: give a TLS certificate and key, or --insecure on a trusted network"
            )

        try:
            store = PoolStore(config.db_path, default_max_attempts=config.default_max_attempts)
        except (sqlite3.Error, OSError) as exc:
            raise PoolStartError(f"cannot open the database {config.db_path}: {exc}") from None
        try:
            _prepare_spool(config.spool_path)
        except OSError as exc:
            store.close()
            raise PoolStartError(
                f"cannot use the spool folder {config.spool_path}: {exc}"
            ) from None
        # Workers could not heartbeat while the pool was down: give each running lease a
        # full timeout from now to reconnect before the reaper may expire it.
        extended = store.extend_running_leases(now_ms() + config.lease_timeout * 1000)
        if extended:
            log.info("gave %d running leases %ds to reconnect", extended, config.lease_timeout)
        core = _Core(config, store, self.stats)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
                # Workers ping every 20 s to notice a dead connection (keepalive); a long-poll
                # carries no data for up to max_wait, and the default policy (one ping per
                # 5 minutes without data) would answer those pings with GOAWAY.
                ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
                ("grpc.http2.max_ping_strikes", 0),
                # And the pool pings too, so a worker whose connection went silent does not
                # hold an upload slot (or a long-poll) for ever.
                ("grpc.keepalive_time_ms", 30_000),
                ("grpc.keepalive_timeout_ms", 10_000),
                ("grpc.so_reuseport", 0),
            ]
        )
        pb_grpc.add_NodeManagerServicer_to_server(NodeManagerService(core), server)
        pb_grpc.add_TaskQueueServicer_to_server(TaskQueueService(core), server)
        health_servicer = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        try:
            if credentials is not None:
                port = server.add_secure_port(config.listen, credentials)
            else:
                port = server.add_insecure_port(config.listen)
        except RuntimeError as exc:
            store.close()
            raise PoolStartError(f"cannot listen on {config.listen}: {exc}") from None
        await server.start()
        for name in ("", *SERVICE_NAMES):
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        self._store, self._server, self._core, self._health = store, server, core, health_servicer
        self._port = port
        self._reaper = asyncio.create_task(self._reap(), name="pool-lease-reaper")
        log.info(
            "pool serving on %s (%s, db %s)",
            self.address,
            "TLS" if credentials else "plaintext",
            config.db_path,
        )
        return port

    async def stop(self, grace: float | None = 1.0) -> None:
        """Stop serving (in-flight calls get `grace` seconds), stop the reaper, close the db."""
        if self._reaper is not None:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
            self._reaper = None
        if self._health is not None:
            await self._health.enter_graceful_shutdown()
            self._health = None
        if self._server is not None:
            await self._server.stop(grace)
            self._server = None
        if self._store is not None:
            self._store.close()
            self._store = None
        self._core = None

    async def wait_closed(self) -> None:
        if self._server is not None:
            await self._server.wait_for_termination()

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.config.reaper_interval)
            core = self._core
            if core is None:
                return
            try:
                out = core.store.expire_leases()
                # Free discarded result blobs a few MiB per pass, never in one long transaction.
                core.store.collect_garbage()
            except Exception:  # the reaper must outlive one bad pass; the next one retries
                log.exception("lease reaper pass failed")
                continue
            for task_id in out.requeued:
                log.info("lease of task %s expired: requeued", task_id)
            for task_id in out.failed:
                log.warning("lease of task %s expired: attempts used up, failed", task_id)
            for task_id in out.cancelled:
                log.info("lease of task %s expired after a cancel: cancelled", task_id)
            self.stats.requeued += len(out.requeued)
            self.stats.expired_failed += len(out.failed)
            if out.requeued:
                core.notify()
