"""NodePoolClient: the gRPC channel to a Node Pool, with deadlines, retries and error mapping."""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import grpc.aio

from hivemind_worker.engine.executors.base import Usage
from hivemind_worker.engine.monitor import HostSample
from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.net import is_loopback
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc
from hivemind_worker.tasks import Resources, TaskResult, TaskSpec, TaskSpecError

if TYPE_CHECKING:
    from hivemind_worker.config import Settings

_T = TypeVar("_T")

CHUNK_BYTES = 1024 * 1024
DEFAULT_TIMEOUT = 10.0
UPLOAD_TIMEOUT = 300.0
LOG_TAIL_REPORT_BYTES = 16 * 1024

# Retries for transient UNAVAILABLE live in the channel's service config (gRPC examples). Only
# calls that are safe to repeat are listed: Ping and heartbeats carry no state change beyond
# renewal, and ReportTaskResult is idempotent per lease. GetAssignedTasks is not retried here:
# a lost reply could strand a lease, so the engine's own loop re-polls instead.
_SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [
                    {"service": "hivemind.nodepool.v1.NodeManager", "method": "Ping"},
                    {"service": "hivemind.nodepool.v1.NodeManager", "method": "UpdateNodeStatus"},
                    {"service": "hivemind.nodepool.v1.NodeManager", "method": "ReportTaskResult"},
                    {"service": "hivemind.nodepool.v1.NodeManager", "method": "RegisterNode"},
                ],
                "retryPolicy": {
                    "maxAttempts": 3,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
_CHANNEL_OPTIONS: list[tuple[str, str | int]] = [
    ("grpc.service_config", _SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", 32 * 1024 * 1024),
    ("grpc.max_send_message_length", 32 * 1024 * 1024),
    # A connection that silently stops answering (Wi-Fi gone, NAT dropped) is noticed within
    # about 30 s, even in the middle of an upload or a long-poll.
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.http2.max_pings_without_data", 0),
    # Each client its own connection: when the engine reconnects after a failure it must
    # not be handed the same dead TCP connection from gRPC's process-wide subchannel pool.
    ("grpc.use_local_subchannel_pool", 1),
]


class PoolError(HiveMindError):
    """A failed call to the pool, as the person should read it; `code` is the gRPC status."""

    kind = ErrorKind.POOL_REFUSED

    def __init__(
        self,
        title: str,
        message: str,
        code: grpc.StatusCode | None = None,
        *,
        details: str = "",
        kind: ErrorKind | None = None,
    ) -> None:
        super().__init__(message, title=title, details=details, kind=kind)
        self.code = code

    def __str__(self) -> str:
        return f"{self.title}: {self.message}"


class PoolUnavailable(PoolError):
    """The pool cannot be reached right now; try again later."""

    kind = ErrorKind.POOL_UNREACHABLE
    retryable = True


class AuthError(PoolError):
    """The pool refused our credentials; the person has to log in again."""

    kind = ErrorKind.LOGIN


class StaleLeaseError(PoolError):
    """The pool no longer honours this lease; the result must be dropped, not retried."""


class NodeUnknownError(PoolError):
    """The pool has forgotten this node (restarted with a new database); register again."""

    kind = ErrorKind.POOL_UNREACHABLE
    retryable = True


class BadRequestError(PoolError):
    """The pool refused what we sent as invalid."""


class NodeStatus(StrEnum):
    IDLE = "idle"
    BUSY = "busy"
    PAUSED = "paused"
    DRAINING = "draining"


_NODE_STATUS = {
    NodeStatus.IDLE: pb.NODE_STATUS_IDLE,
    NodeStatus.BUSY: pb.NODE_STATUS_BUSY,
    NodeStatus.PAUSED: pb.NODE_STATUS_PAUSED,
    NodeStatus.DRAINING: pb.NODE_STATUS_DRAINING,
}


@dataclass(frozen=True)
class Registration:
    """What this node tells the pool about itself when it registers."""

    node_id: str
    hostname: str
    cpu_cores: int
    memory_bytes: int
    disk_bytes: int
    capabilities: tuple[str, ...]
    agent_version: str
    platform: str
    caps: Resources
    max_concurrent_tasks: int


@dataclass(frozen=True)
class PoolTerms:
    """What the pool answers a registration with; None: the pool left it to us."""

    heartbeat_interval: float | None = None
    lease_timeout: float | None = None
    max_wait: int | None = None
    preload_images: tuple[str, ...] = ()


@dataclass(frozen=True)
class RunningLease:
    task_id: str
    lease_id: str
    usage: Usage | None = None


@dataclass(frozen=True)
class HeartbeatReply:
    cancel_task_ids: tuple[str, ...] = ()
    lost_lease_ids: frozenset[str] = frozenset()
    drain: bool = False
    # The pool's pace from now on; None: unchanged (or a pool that does not say).
    heartbeat_interval: float | None = None
    lease_timeout: float | None = None


@dataclass(frozen=True)
class Offer:
    """A long-poll's terms: what fits here now, and what this worker accepts."""

    free: Resources
    max_tasks: int
    wait_seconds: int
    capabilities: tuple[str, ...]
    max_timeout_seconds: int
    networks: tuple[str, ...]


@dataclass(frozen=True)
class RefusedSpec:
    """A task the pool handed out whose spec does not validate: it is refused, never run."""

    task_id: str
    lease_id: str
    reason: str


def map_rpc_error(exc: grpc.RpcError, doing: str, address: str) -> PoolError:
    """Translate a gRPC error into the app's taxonomy, at this one boundary.

    The message is for a person; gRPC's own text goes to `details` (the log, "Details").
    """
    code = exc.code() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else None
    raw = (exc.details() if isinstance(exc, grpc.Call | grpc.aio.AioRpcError) else "") or ""
    details = f"could not {doing}: {code.name if code else 'error'}: {raw}"
    if code is grpc.StatusCode.UNAVAILABLE and any(
        word in raw.lower() for word in ("ssl", "handshake", "certificate", "tls")
    ):
        return PoolUnavailable(
            "Secure connection failed",
            f"The secure connection to {address} failed: its certificate is not trusted "
            "(set ca_file to the pool's CA) or it does not speak TLS.",
            code,
            details=details,
        )
    if code in (grpc.StatusCode.ABORTED, grpc.StatusCode.RESOURCE_EXHAUSTED):
        return PoolUnavailable(
            "Node Pool busy", f"The pool at {address} is busy ({raw}).", code, details=details
        )
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED):
        return PoolUnavailable(
            "Node Pool unreachable",
            f"Can't reach the pool at {address}: it did not answer.",
            code,
            details=details,
        )
    if code is grpc.StatusCode.UNAUTHENTICATED:
        return AuthError(
            "Login needed",
            f"The pool at {address} refused the login ({raw}); sign in again.",
            code,
            details=details,
        )
    if code is grpc.StatusCode.PERMISSION_DENIED:
        return AuthError("Not allowed", f"The pool refused: {raw}.", code, details=details)
    if code is grpc.StatusCode.FAILED_PRECONDITION:
        return StaleLeaseError("Lease no longer valid", raw, code, details=details)
    if code is grpc.StatusCode.NOT_FOUND:
        return NodeUnknownError(
            "Unknown to the pool", f"The pool does not know this: {raw}.", code, details=details
        )
    if code in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.OUT_OF_RANGE):
        return BadRequestError(
            "Request refused", f"The pool refused the request: {raw}.", code, details=details
        )
    if code is grpc.StatusCode.CANCELLED:
        return PoolUnavailable(
            "Call cancelled", f"The call to {address} was cancelled.", code, details=details
        )
    return PoolError(
        "Node Pool error",
        f"The pool at {address} failed to {doing}.",
        code,
        details=details,
        kind=ErrorKind.INTERNAL,
    )


class NodePoolClient:
    """One channel to one pool, with a bearer token on every call but Login and Ping."""

    def __init__(
        self,
        address: str,
        *,
        token: str = "",
        insecure: bool = False,
        ca_file: Path | None = None,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        self.address = address
        if token and not all(" " < ch < "\x7f" for ch in token):
            # gRPC refuses such a header deep in its C core, with no status to map.
            raise AuthError("Login damaged", "The stored login is damaged; sign in again.")
        self.token = token
        self.timeout = timeout
        # TLS everywhere but loopback; plaintext elsewhere only when the person says so. A CA
        # file means the person set TLS up on purpose, so it is used on loopback too.
        self.tls = ca_file is not None or not (is_loopback(address) or insecure)
        if not self.tls:
            self._channel = grpc.aio.insecure_channel(address, options=_CHANNEL_OPTIONS)
        else:
            root = ca_file.read_bytes() if ca_file else None
            creds = grpc.ssl_channel_credentials(root_certificates=root)
            self._channel = grpc.aio.secure_channel(address, creds, options=_CHANNEL_OPTIONS)
        self._stub = pb_grpc.NodeManagerStub(self._channel)

    async def close(self) -> None:
        await self._channel.close(grace=None)

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    async def _call(self, doing: str, call: Awaitable[_T]) -> _T:
        """Await one RPC, translating its failures into the app's errors."""
        try:
            return await call
        except grpc.RpcError as exc:
            raise map_rpc_error(exc, doing, self.address) from None
        except asyncio.CancelledError:
            # grpc.aio cancels calls in flight when their channel is closed (the engine
            # reconnecting): that is a lost connection, not a cancellation of the caller.
            task = asyncio.current_task()
            if task is not None and task.cancelling():
                raise
            raise PoolUnavailable(
                "Connection closed", f"could not {doing}: the connection was closed", None
            ) from None

    async def ping(self) -> str:
        """The pool's version, once it answers."""
        reply = await self._call(
            "reach the pool", self._stub.Ping(pb.PingRequest(), timeout=self.timeout)
        )
        return reply.server_version

    async def login(self, username: str, password: str) -> str:
        """A session token for the account."""
        request = pb.LoginRequest(username=username, password=password)
        reply = await self._call("log in", self._stub.Login(request, timeout=self.timeout))
        return reply.token

    async def register(self, node: Registration) -> PoolTerms:
        reply = await self._call(
            "register this node",
            self._stub.RegisterNode(
                pb.RegisterNodeRequest(
                    node_id=node.node_id,
                    hostname=node.hostname,
                    cpu_cores=node.cpu_cores,
                    memory_bytes=node.memory_bytes,
                    disk_bytes=node.disk_bytes,
                    capabilities=list(node.capabilities),
                    agent_version=node.agent_version,
                    platform=node.platform,
                    caps=node.caps.to_proto(),
                    max_concurrent_tasks=node.max_concurrent_tasks,
                ),
                timeout=self.timeout,
                metadata=self._metadata(),
            ),
        )
        if not reply.accepted:
            raise PoolError(
                "Registration refused",
                f"The pool refused this computer: {reply.message or 'no reason given'}.",
            )
        return PoolTerms(
            heartbeat_interval=float(reply.heartbeat_interval_seconds) or None,
            lease_timeout=float(reply.lease_timeout_seconds) or None,
            max_wait=int(reply.max_wait_seconds) or None,
            preload_images=tuple(reply.preload_images),
        )

    async def heartbeat(
        self,
        node_id: str,
        status: NodeStatus,
        host: HostSample,
        running: list[RunningLease],
        status_message: str = "",
    ) -> HeartbeatReply:
        """`status_message`: why, when PAUSED by the worker's own rules ("on battery")."""
        request = pb.UpdateNodeStatusRequest(
            node_id=node_id,
            status=_NODE_STATUS[status],
            status_message=status_message,
            timestamp_unix_ms=int(time.time() * 1000),
            metrics=pb.HostMetrics(
                cpu_percent=host.cpu_percent,
                memory_used_bytes=host.memory_used_bytes,
                memory_total_bytes=host.memory_total_bytes,
                disk_free_bytes=host.disk_free_bytes,
            ),
            running=[
                pb.RunningTask(
                    task_id=r.task_id,
                    lease_id=r.lease_id,
                    usage=None
                    if r.usage is None
                    else pb.ResourceUsage(
                        cpu_percent=r.usage.cpu_percent,
                        memory_bytes=r.usage.memory_bytes,
                        cpu_seconds=r.usage.cpu_seconds,
                        network_rx_bytes=r.usage.network_rx_bytes,
                        network_tx_bytes=r.usage.network_tx_bytes,
                    ),
                )
                for r in running
            ],
        )
        reply = await self._call(
            "send a heartbeat",
            self._stub.UpdateNodeStatus(request, timeout=self.timeout, metadata=self._metadata()),
        )
        return HeartbeatReply(
            cancel_task_ids=tuple(reply.cancel_task_ids),
            lost_lease_ids=frozenset(reply.lost_lease_ids),
            drain=reply.drain,
            heartbeat_interval=float(reply.heartbeat_interval_seconds) or None,
            lease_timeout=float(reply.lease_timeout_seconds) or None,
        )

    async def get_tasks(self, node_id: str, offer: Offer) -> list[TaskSpec | RefusedSpec]:
        """Long-poll for tasks; each one validated here, at the boundary, into a TaskSpec."""
        request = pb.GetAssignedTasksRequest(
            node_id=node_id,
            free=offer.free.to_proto(),
            max_tasks=offer.max_tasks,
            wait_seconds=offer.wait_seconds,
            capabilities=list(offer.capabilities),
            max_timeout_seconds=offer.max_timeout_seconds,
            networks=list(offer.networks),
        )
        # The deadline covers the long-poll the pool may hold, plus the usual margin.
        deadline = request.wait_seconds + self.timeout
        reply = await self._call(
            "ask for tasks",
            self._stub.GetAssignedTasks(request, timeout=deadline, metadata=self._metadata()),
        )
        specs: list[TaskSpec | RefusedSpec] = []
        for wire in reply.tasks:
            try:
                specs.append(TaskSpec.from_proto(wire, require_lease=True))
            except TaskSpecError as exc:
                specs.append(RefusedSpec(wire.task_id[:128], wire.lease_id[:128], str(exc)))
        return specs

    async def report(self, node_id: str, result: TaskResult) -> None:
        """Report a task's end; idempotent per lease at the pool."""
        has_archive = result.archive is not None
        request = pb.ReportTaskResultRequest(
            node_id=node_id,
            task_id=result.task_id,
            lease_id=result.lease_id,
            status=result.status.to_proto(),
            exit_code=result.exit_code,
            error=result.error[:4000],
            exclude_this_node=result.exclude_this_node,
            log_tail=result.log_tail[-LOG_TAIL_REPORT_BYTES:],
            result_sha256=result.archive_sha256 if has_archive else "",
            result_size=result.archive_size if has_archive else 0,
            started_unix_ms=int(result.started_at * 1000),
            finished_unix_ms=int(result.finished_at * 1000),
            usage=pb.ResourceUsage(
                cpu_seconds=result.cpu_seconds, max_memory_bytes=result.max_memory_bytes
            ),
        )
        await self._call(
            f"report task {request.task_id}",
            self._stub.ReportTaskResult(request, timeout=self.timeout, metadata=self._metadata()),
        )

    async def upload(self, node_id: str, result: TaskResult) -> None:
        """Stream a result archive in 1 MiB chunks; the pool checks the sha256 in the header."""
        archive = result.archive
        if archive is None:
            return
        header = pb.UploadHeader(
            node_id=node_id,
            task_id=result.task_id,
            lease_id=result.lease_id,
            total_size=result.archive_size,
            sha256=result.archive_sha256,
        )

        doing = f"upload the result of {header.task_id}"
        call = self._stub.UploadTaskResult(timeout=UPLOAD_TIMEOUT, metadata=self._metadata())
        try:
            cut_short = await self._call(doing, _send_upload(call, header, archive))
        except BaseException:
            call.cancel()  # an unreadable archive or a stop: the pool frees what it reserved
            raise
        try:
            await self._call(doing, call)
        except PoolError as exc:
            if not (cut_short and exc.code is grpc.StatusCode.INTERNAL):
                raise
            # gRPC put its own INTERNAL for the failed write in place of the pool's status
            # (e.g. RESOURCE_EXHAUSTED, "retry later"): the reason is lost, so send it again
            # rather than take it for a refusal and drop a good result.
            raise PoolUnavailable(
                "Upload cut short",
                f"The pool at {self.address} ended the upload before taking all of it; "
                "it will be sent again.",
                exc.code,
                details=exc.details,
            ) from None


async def _send_upload(
    call: grpc.aio.StreamUnaryCall[pb.UploadTaskResultRequest, pb.UploadTaskResultResponse],
    header: pb.UploadHeader,
    archive: Path,
) -> bool:
    """Send an upload's header and chunks one by one; True when the call ended first.

    A pool that refuses an upload (busy, too big, superseded) ends the call while chunks may
    still be going out. The write in flight then fails, and gRPC records its own INTERNAL as
    the call's status, or the pool's if that arrived first: the caller awaits the call either
    way, and this says whether the status may be gRPC's.
    """
    try:
        await call.write(pb.UploadTaskResultRequest(header=header))
        with archive.open("rb") as fh:  # reads go to a thread: never block the loop on disk
            while chunk := await asyncio.to_thread(fh.read, CHUNK_BYTES):
                await call.write(pb.UploadTaskResultRequest(data=chunk))
        await call.done_writing()
    except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
        return True  # the call has ended; awaiting it gives the status
    return False


def client_for(
    settings: Settings, *, token: str = "", timeout: float = DEFAULT_TIMEOUT
) -> NodePoolClient:
    """A client to the pool the settings name, with their TLS choices."""
    return NodePoolClient(
        settings.node_pool_address,
        token=token,
        insecure=settings.insecure,
        ca_file=Path(settings.ca_file) if settings.ca_file else None,
        timeout=timeout,
    )


def file_sha256(path: Path) -> tuple[str, int]:
    """Hex sha256 and size of a file, read in chunks."""
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as fh:
        while chunk := fh.read(CHUNK_BYTES):
            digest.update(chunk)
            size += len(chunk)
    return digest.hexdigest(), size
