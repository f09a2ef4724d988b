"""A small grpc.aio client for a pool's TaskQueue: log in, submit, watch, cancel, download."""

from __future__ import annotations

import asyncio
import builtins
import hashlib
from collections.abc import Iterable
from types import TracebackType
from typing import TYPE_CHECKING

import grpc

from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.net import is_loopback
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc
from hivemind_worker.tasks import MiB

if TYPE_CHECKING:
    from hivemind_worker.protocol.nodepool_pb2_grpc import (
        NodeManagerAsyncStub,
        TaskQueueAsyncStub,
    )

MAX_MESSAGE_BYTES = 32 * MiB
FINAL_STATUSES = frozenset(
    {
        pb.TASK_STATUS_SUCCEEDED,
        pb.TASK_STATUS_FAILED,
        pb.TASK_STATUS_TIMED_OUT,
        pb.TASK_STATUS_CANCELLED,
        pb.TASK_STATUS_REJECTED,
        pb.TASK_STATUS_OUT_OF_MEMORY,
    }
)


class ResultIntegrityError(HiveMindError):
    """A downloaded result does not match the size or sha256 the pool announced."""

    kind = ErrorKind.RESULT_REFUSED
    title = "Result damaged"


class TaskQueueClient:
    """Talks to one pool; every call carries a deadline and, after login, the bearer token.

    TLS is used unless the address is loopback (or `tls=False` is given explicitly);
    `root_certificates` (PEM) trusts a private CA or a self-signed pool certificate.
    Create and use it on one event loop; `close()` when done (or `async with`).
    """

    def __init__(
        self,
        address: str,
        *,
        timeout: float = 30.0,
        tls: bool | None = None,
        root_certificates: bytes | None = None,
        token: str | None = None,
    ) -> None:
        self.address = address
        self.timeout = timeout
        if tls is None:
            tls = root_certificates is not None or not is_loopback(address)
        self.tls = tls
        self._root_certificates = root_certificates
        self.token = token
        self.username = ""
        self._channel: grpc.aio.Channel | None = None
        self._tasks: TaskQueueAsyncStub | None = None
        self._nodes: NodeManagerAsyncStub | None = None

    # grpc.aio channels bind to the running loop, so the channel is made on first use.
    def _stubs(self) -> tuple[NodeManagerAsyncStub, TaskQueueAsyncStub]:
        if self._channel is None:
            options = [
                ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
                ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
            ]
            if self.tls:
                creds = grpc.ssl_channel_credentials(self._root_certificates)
                self._channel = grpc.aio.secure_channel(self.address, creds, options=options)
            else:
                self._channel = grpc.aio.insecure_channel(self.address, options=options)
            self._nodes = pb_grpc.NodeManagerStub(self._channel)
            self._tasks = pb_grpc.TaskQueueStub(self._channel)
        assert self._nodes is not None and self._tasks is not None
        return self._nodes, self._tasks

    def _metadata(self) -> tuple[tuple[str, str], ...]:
        if not self.token:
            raise RuntimeError("log in first: TaskQueueClient.login(user, password)")
        return (("authorization", f"Bearer {self.token}"),)

    async def login(self, username: str, password: str) -> pb.LoginResponse:
        nodes, _ = self._stubs()
        reply = await nodes.Login(
            pb.LoginRequest(username=username, password=password), timeout=self.timeout
        )
        self.token = reply.token
        self.username = reply.username
        return reply

    async def ping(self) -> pb.PingResponse:
        nodes, _ = self._stubs()
        return await nodes.Ping(pb.PingRequest(), timeout=self.timeout)

    async def submit(self, spec: pb.TaskSpec) -> str:
        _, tasks = self._stubs()
        reply = await tasks.SubmitTask(
            pb.SubmitTaskRequest(spec=spec), timeout=self.timeout, metadata=self._metadata()
        )
        return reply.task_id

    async def submit_many(self, specs: Iterable[pb.TaskSpec]) -> builtins.list[str]:
        """Submit many tasks in one call (at most 1,000), all or none; their ids in order."""
        _, tasks = self._stubs()
        reply = await tasks.SubmitTasks(
            pb.SubmitTasksRequest(specs=builtins.list(specs)),
            timeout=self.timeout,
            metadata=self._metadata(),
        )
        return builtins.list(reply.task_ids)

    async def get(self, task_id: str) -> pb.TaskInfo:
        _, tasks = self._stubs()
        return await tasks.GetTask(
            pb.GetTaskRequest(task_id=task_id), timeout=self.timeout, metadata=self._metadata()
        )

    async def list(
        self, statuses: Iterable[pb.TaskStatus.ValueType] = (), limit: int = 0
    ) -> builtins.list[pb.TaskInfo]:
        """The caller's tasks, newest first, without input contents."""
        _, tasks = self._stubs()
        reply = await tasks.ListTasks(
            pb.ListTasksRequest(statuses=builtins.list(statuses), limit=limit),
            timeout=self.timeout,
            metadata=self._metadata(),
        )
        return builtins.list(reply.tasks)

    async def cancel(self, task_id: str, reason: str = "") -> pb.TaskStatus.ValueType:
        """CANCELLED at once for a queued task; RUNNING while the worker stops it."""
        _, tasks = self._stubs()
        reply = await tasks.CancelTask(
            pb.CancelTaskRequest(task_id=task_id, reason=reason),
            timeout=self.timeout,
            metadata=self._metadata(),
        )
        return reply.status

    async def download(self, task_id: str) -> bytes:
        """The task's result archive, checked against the size and sha256 the pool gives."""
        _, tasks = self._stubs()
        call = tasks.DownloadTaskResult(
            pb.DownloadTaskResultRequest(task_id=task_id),
            timeout=max(self.timeout, 300.0),
            metadata=self._metadata(),
        )
        parts: builtins.list[bytes] = []
        total_size = -1
        expected = ""
        async for chunk in call:
            if total_size < 0:
                total_size, expected = chunk.total_size, chunk.sha256
            parts.append(chunk.data)
        data = b"".join(parts)
        digest = hashlib.sha256(data).hexdigest()
        if len(data) != max(total_size, 0) or digest != expected:
            raise ResultIntegrityError(
                f"result of task {task_id} is damaged: got {len(data)} bytes with sha256 "
                f"{digest}, the pool announced {total_size} bytes with sha256 {expected}"
            )
        return data

    async def wait_done(
        self, task_ids: Iterable[str], timeout: float, poll_interval: float = 0.2
    ) -> dict[str, pb.TaskInfo]:
        """Poll until every task is final; TimeoutError naming the unfinished ones otherwise."""
        pending = builtins.list(dict.fromkeys(task_ids))
        done: dict[str, pb.TaskInfo] = {}
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            for task_id in builtins.list(pending):
                info = await self.get(task_id)
                if info.status in FINAL_STATUSES:
                    done[task_id] = info
                    pending.remove(task_id)
            if not pending:
                return done
            if loop.time() >= deadline:
                raise TimeoutError(
                    f"{len(pending)} task(s) not finished after {timeout:g}s: "
                    + ", ".join(pending[:5])
                )
            await asyncio.sleep(poll_interval)

    async def close(self) -> None:
        if self._channel is not None:
            await self._channel.close()
            self._channel = None
            self._nodes = self._tasks = None

    async def __aenter__(self) -> TaskQueueClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
