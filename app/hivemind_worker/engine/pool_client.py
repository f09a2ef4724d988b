"""NodePoolClient: the gRPC channel to a Node Pool, with deadlines, retries and error mapping."""

from __future__ import annotations

import asyncio
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import grpc
import grpc.aio

from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.net import is_loopback
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from hivemind_worker.config import Settings

_T = TypeVar("_T")

CHUNK_BYTES = 1024 * 1024
DEFAULT_TIMEOUT = 10.0
UPLOAD_TIMEOUT = 300.0

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

    async def ping(self) -> pb.PingResponse:
        return await self._call(
            "reach the pool", self._stub.Ping(pb.PingRequest(), timeout=self.timeout)
        )

    async def login(self, username: str, password: str) -> pb.LoginResponse:
        request = pb.LoginRequest(username=username, password=password)
        return await self._call("log in", self._stub.Login(request, timeout=self.timeout))

    async def register(self, request: pb.RegisterNodeRequest) -> pb.RegisterNodeResponse:
        return await self._call(
            "register this node",
            self._stub.RegisterNode(request, timeout=self.timeout, metadata=self._metadata()),
        )

    async def heartbeat(self, request: pb.UpdateNodeStatusRequest) -> pb.UpdateNodeStatusResponse:
        return await self._call(
            "send a heartbeat",
            self._stub.UpdateNodeStatus(request, timeout=self.timeout, metadata=self._metadata()),
        )

    async def get_tasks(self, request: pb.GetAssignedTasksRequest) -> list[pb.TaskSpec]:
        # The deadline covers the long-poll the pool may hold, plus the usual margin.
        deadline = request.wait_seconds + self.timeout
        reply = await self._call(
            "ask for tasks",
            self._stub.GetAssignedTasks(request, timeout=deadline, metadata=self._metadata()),
        )
        return list(reply.tasks)

    async def report(self, request: pb.ReportTaskResultRequest) -> pb.ReportTaskResultResponse:
        return await self._call(
            f"report task {request.task_id}",
            self._stub.ReportTaskResult(request, timeout=self.timeout, metadata=self._metadata()),
        )

    async def upload(self, header: pb.UploadHeader, archive: Path) -> pb.UploadTaskResultResponse:
        """Stream a result archive in 1 MiB chunks; the pool checks the sha256 in the header."""

        async def parts() -> AsyncIterator[pb.UploadTaskResultRequest]:
            yield pb.UploadTaskResultRequest(header=header)
            with archive.open("rb") as fh:  # reads go to a thread: never block the loop on disk
                while chunk := await asyncio.to_thread(fh.read, CHUNK_BYTES):
                    yield pb.UploadTaskResultRequest(data=chunk)

        return await self._call(
            f"upload the result of {header.task_id}",
            self._stub.UploadTaskResult(parts(), timeout=UPLOAD_TIMEOUT, metadata=self._metadata()),
        )


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
