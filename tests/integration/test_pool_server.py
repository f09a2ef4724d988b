"""The reference pool over real gRPC on 127.0.0.1:0 and a real SQLite file; tests act as worker."""

from __future__ import annotations

import asyncio
import gc
import hashlib
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from helpers.harness import sha
from hivemind_worker.engine.pool_client import NodePoolClient, PoolUnavailable
from hivemind_worker.pool import server as pool_server
from hivemind_worker.pool.client import TaskQueueClient
from hivemind_worker.pool.server import PoolConfig, PoolServer, PoolStartError, RecentCounter
from hivemind_worker.pool.store import verify_password
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc
from hivemind_worker.tasks import GiB, MiB, TaskResult, TaskStatus

pytestmark = pytest.mark.timeout(60)

USER, PASSWORD = "alice", "correct horse"
BIG = pb.Resources(cpus=64, memory_bytes=64 * GiB, disk_bytes=1024 * GiB, gpus=0)
GUARD = 10.0  # a hang guard only; nothing here asserts on durations

PoolFactory = Callable[..., Awaitable[PoolServer]]


@pytest.fixture
async def pool_factory(tmp_path: Path) -> AsyncIterator[PoolFactory]:
    """Start pools on port 0 over tmp_path/pool.db (same file each time, for restarts)."""
    servers: list[PoolServer] = []

    async def make(**overrides: Any) -> PoolServer:
        overrides.setdefault("reaper_interval", 0.2)
        config = PoolConfig(db_path=tmp_path / "pool.db", listen="127.0.0.1:0", **overrides)
        server = PoolServer(config)
        await server.start()
        servers.append(server)
        for name in (USER, "bob"):
            if server.store.password_hash(name) is None:
                server.store.add_user(name, PASSWORD)
        return server

    yield make
    for server in servers:
        await server.stop(0)


@pytest.fixture
async def pool(pool_factory: PoolFactory) -> PoolServer:
    return await pool_factory()


@pytest.fixture
async def pool_client(pool: PoolServer) -> AsyncIterator[TaskQueueClient]:
    client = TaskQueueClient(pool.address, timeout=GUARD)
    await client.login(USER, PASSWORD)
    yield client
    await client.close()


class Worker:
    """A worker made of raw stubs, so each test controls exactly what is sent."""

    def __init__(self, address: str, node_id: str = "node-1") -> None:
        self.node_id = node_id
        self.channel = grpc.aio.insecure_channel(
            address, options=[("grpc.max_send_message_length", 32 * MiB)]
        )
        self.stub = pb_grpc.NodeManagerStub(self.channel)
        self.token = ""

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    async def start(
        self, capabilities: Iterable[str] = ("process",), user: str = USER
    ) -> pb.RegisterNodeResponse:
        reply = await self.stub.Login(pb.LoginRequest(username=user, password=PASSWORD))
        self.token = reply.token
        return await self.stub.RegisterNode(
            pb.RegisterNodeRequest(node_id=self.node_id, capabilities=list(capabilities)),
            metadata=self.md,
            timeout=GUARD,
        )

    async def poll(
        self,
        free: pb.Resources = BIG,
        max_tasks: int = 10,
        wait: int = 0,
        capabilities: Iterable[str] = (),
    ) -> list[pb.TaskSpec]:
        reply = await self.stub.GetAssignedTasks(
            pb.GetAssignedTasksRequest(
                node_id=self.node_id,
                free=free,
                max_tasks=max_tasks,
                wait_seconds=wait,
                capabilities=list(capabilities),
            ),
            metadata=self.md,
            timeout=GUARD + wait,
        )
        return list(reply.tasks)

    async def heartbeat(self, *specs: pb.TaskSpec) -> pb.UpdateNodeStatusResponse:
        return await self.stub.UpdateNodeStatus(
            pb.UpdateNodeStatusRequest(
                node_id=self.node_id,
                status=pb.NODE_STATUS_BUSY,
                running=[pb.RunningTask(task_id=s.task_id, lease_id=s.lease_id) for s in specs],
            ),
            metadata=self.md,
            timeout=GUARD,
        )

    async def report(
        self,
        spec: pb.TaskSpec,
        status: pb.TaskStatus.ValueType = pb.TASK_STATUS_SUCCEEDED,
        data: bytes | None = None,
        **extra: Any,
    ) -> pb.ReportTaskResultResponse:
        if data is not None:
            extra.update(result_sha256=hashlib.sha256(data).hexdigest(), result_size=len(data))
        return await self.stub.ReportTaskResult(
            pb.ReportTaskResultRequest(
                node_id=self.node_id,
                task_id=spec.task_id,
                lease_id=spec.lease_id,
                status=status,
                **extra,
            ),
            metadata=self.md,
            timeout=GUARD,
        )

    async def upload(
        self,
        spec: pb.TaskSpec,
        data: bytes,
        chunk: int = MiB,
        sha256: str | None = None,
        total_size: int | None = None,
    ) -> pb.UploadTaskResultResponse:
        messages = [
            pb.UploadTaskResultRequest(
                header=pb.UploadHeader(
                    node_id=self.node_id,
                    task_id=spec.task_id,
                    lease_id=spec.lease_id,
                    total_size=len(data) if total_size is None else total_size,
                    sha256=sha256 or hashlib.sha256(data).hexdigest(),
                )
            ),
            *(
                pb.UploadTaskResultRequest(data=data[i : i + chunk])
                for i in range(0, len(data), chunk)
            ),
        ]
        # A pool that refuses an upload ends the call; a write still in flight then fails and
        # gRPC records its own INTERNAL as the call's status in place of the pool's. Tests of a
        # refusal therefore send nothing after the message that is refused (a refusal at the
        # header: `data=b""` with the header's size and sha256 given).
        call = self.stub.UploadTaskResult(metadata=self.md, timeout=GUARD)
        try:
            for message in messages:
                await call.write(message)
            await call.done_writing()
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            pass  # the call has ended; awaiting it gives the status
        return await call

    async def close(self) -> None:
        await self.channel.close()


@pytest.fixture
async def worker(pool: PoolServer) -> AsyncIterator[Worker]:
    w = Worker(pool.address)
    await w.start()
    yield w
    await w.close()


def py_spec(name: str = "", memory: int = 0, **fields: Any) -> pb.TaskSpec:
    return pb.TaskSpec(
        kind=pb.TASK_KIND_PYTHON,
        source="print('hello')",
        name=name,
        resources=pb.Resources(memory_bytes=memory),
        **fields,
    )


async def rpc_error(call: Awaitable[object]) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as info:
        await asyncio.wait_for(call, GUARD)
    return info.value


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` until true, bounded by the hang guard."""
    async with asyncio.timeout(GUARD):
        while True:
            if await check():
                return
            await asyncio.sleep(0.05)


async def status_of(client: TaskQueueClient, task_id: str) -> pb.TaskInfo:
    return await client.get(task_id)


# ------------------------------------------------------------------------- auth


async def test_login_and_bearer_tokens(pool_factory: PoolFactory) -> None:
    pool = await pool_factory(token_ttl=1)
    stub = pb_grpc.NodeManagerStub(grpc.aio.insecure_channel(pool.address))
    tasks = pb_grpc.TaskQueueStub(grpc.aio.insecure_channel(pool.address))
    ok = await stub.Login(pb.LoginRequest(username=USER, password=PASSWORD), timeout=GUARD)
    assert ok.token and ok.username == USER and ok.expires_unix_ms > 0

    bad = await rpc_error(stub.Login(pb.LoginRequest(username=USER, password="nope")))
    assert bad.code() == grpc.StatusCode.UNAUTHENTICATED
    assert bad.details() == "wrong username or password"
    nobody = await rpc_error(stub.Login(pb.LoginRequest(username="mallory", password="x")))
    assert nobody.details() == "wrong username or password"

    request = pb.ListTasksRequest()
    missing = await rpc_error(tasks.ListTasks(request))
    assert (missing.code(), missing.details()) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "missing bearer token",
    )
    garbage = await rpc_error(tasks.ListTasks(request, metadata=(("authorization", "Bearer x"),)))
    assert garbage.code() == grpc.StatusCode.UNAUTHENTICATED
    assert "log in again" in garbage.details()
    not_bearer = await rpc_error(tasks.ListTasks(request, metadata=(("authorization", ok.token),)))
    assert not_bearer.code() == grpc.StatusCode.UNAUTHENTICATED

    good_md = (("authorization", f"Bearer {ok.token}"),)
    assert (await tasks.ListTasks(request, metadata=good_md, timeout=GUARD)).tasks == []
    # Ping needs no token.
    assert (await stub.Ping(pb.PingRequest(), timeout=GUARD)).server_time_unix_ms > 0

    await asyncio.sleep(1.1)  # token_ttl=1
    expired = await rpc_error(tasks.ListTasks(request, metadata=good_md))
    assert (expired.code(), expired.details()) == (
        grpc.StatusCode.UNAUTHENTICATED,
        "token expired; log in again",
    )


async def test_failed_logins_are_throttled(
    pool_factory: PoolFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    window = 1.5
    pool = await pool_factory(login_failure_window=window)
    checks = 0

    def counting_verify(password: str, stored: str | None) -> bool:
        nonlocal checks
        checks += 1
        return verify_password(password, stored)

    monkeypatch.setattr(pool_server, "verify_password", counting_verify)
    channel = grpc.aio.insecure_channel(pool.address)
    stub = pb_grpc.NodeManagerStub(channel)

    def login(user: str, password: str) -> Awaitable[pb.LoginResponse]:
        return stub.Login(pb.LoginRequest(username=user, password=password), timeout=GUARD)

    for _ in range(5):
        err = await rpc_error(login(USER, "wrong"))
        assert err.details() == "wrong username or password"
    assert checks == 5
    # The right password is refused too while the window lasts, without a password check.
    err = await rpc_error(login(USER, PASSWORD))
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED
    assert err.details() == "too many failed logins; try again in 2 s"
    # So is any login from the same peer address (5 failures from 127.0.0.1).
    err = await rpc_error(login("bob", PASSWORD))
    assert (err.details() or "").startswith("too many failed logins; try again in")
    assert checks == 5

    await asyncio.sleep(window + 0.2)
    assert (await login(USER, PASSWORD)).username == USER
    assert checks == 6
    # A success clears the user's failures; the peer's failures start afresh after the block.
    for _ in range(4):
        await rpc_error(login("mallory", "guess"))
    assert (await login(USER, PASSWORD)).token
    await channel.close()


async def test_health_service_serving(pool: PoolServer) -> None:
    async with grpc.aio.insecure_channel(pool.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in (
            "",
            "hivemind.nodepool.v1.NodeManager",
            "hivemind.nodepool.v1.TaskQueue",
        ):
            reply = await health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5)
            assert reply.status == health_pb2.HealthCheckResponse.SERVING


async def test_register_returns_pool_timings(pool_factory: PoolFactory) -> None:
    pool = await pool_factory(heartbeat_interval=7, lease_timeout=42, max_wait=9)
    w = Worker(pool.address)
    reply = await w.start()
    assert reply.accepted
    assert (
        reply.heartbeat_interval_seconds,
        reply.lease_timeout_seconds,
        reply.max_wait_seconds,
    ) == (7, 42, 9)
    unknown = Worker(pool.address, node_id="ghost")
    unknown.token = w.token
    err = await rpc_error(unknown.heartbeat())
    assert (err.code(), err.details()) == (
        grpc.StatusCode.NOT_FOUND,
        "node ghost is not registered",
    )
    err = await rpc_error(unknown.poll())
    assert err.code() == grpc.StatusCode.NOT_FOUND
    # Another user cannot take over the node.
    bob = Worker(pool.address)
    err = await rpc_error(bob.start(user="bob"))
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    await w.close()
    await unknown.close()
    await bob.close()


# ------------------------------------------------------------------- round trip


async def test_submit_lease_upload_report_download(
    pool: PoolServer, pool_client: TaskQueueClient, worker: Worker
) -> None:
    task_id = await pool_client.submit(py_spec("round trip"))
    queued = await pool_client.get(task_id)
    assert queued.status == pb.TASK_STATUS_QUEUED

    (spec,) = await worker.poll()
    assert spec.task_id == task_id and spec.lease_id and spec.attempt == 1
    # The pool hands out the spec with defaults applied.
    assert spec.resources.memory_bytes == 512 * MiB and spec.network == "none"
    running = await pool_client.get(task_id)
    assert running.status == pb.TASK_STATUS_RUNNING and running.spec.lease_id == spec.lease_id

    data = bytes(range(256)) * (10 * 1024) + b"tail"  # ~2.5 MiB: three chunks
    up = await worker.upload(spec, data)
    assert up.size == len(data) and up.sha256 == hashlib.sha256(data).hexdigest()
    ack = await worker.report(spec, data=data, exit_code=0, log_tail=b"hello\n")
    assert ack.ack and ack.recorded_status == pb.TASK_STATUS_SUCCEEDED

    done = await pool_client.wait_done([task_id], timeout=GUARD)
    info = done[task_id]
    assert info.status == pb.TASK_STATUS_SUCCEEDED
    assert info.result_sha256 == up.sha256 and info.result_size == len(data)
    assert info.log_tail == b"hello\n" and info.node_id == "node-1"
    assert await pool_client.download(task_id) == data

    listed = await pool_client.list()
    assert [t.spec.task_id for t in listed] == [task_id]
    assert listed[0].spec.source == ""  # listings leave contents out
    assert pool.stats.reports_by_lease[spec.lease_id] == 1


async def test_report_is_idempotent_per_lease(
    pool: PoolServer, pool_client: TaskQueueClient, worker: Worker
) -> None:
    task_id = await pool_client.submit(py_spec())
    (spec,) = await worker.poll()
    data = b"result"
    await worker.upload(spec, data)
    first = await worker.report(spec, data=data)
    again = await worker.report(spec, data=data)
    assert first == again
    assert again.recorded_status == pb.TASK_STATUS_SUCCEEDED
    assert pool.stats.reports_by_lease[spec.lease_id] == 2
    assert pool.store.counters()["reports"] == 1
    assert await pool_client.download(task_id) == data


async def test_report_validation(pool_client: TaskQueueClient, worker: Worker) -> None:
    await pool_client.submit(py_spec())
    (spec,) = await worker.poll()
    err = await rpc_error(worker.report(spec, status=pb.TASK_STATUS_RUNNING))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("status:")
    err = await rpc_error(worker.report(spec, result_sha256="abc"))
    assert err.details().startswith("result_sha256:")
    # A digest that names no upload.
    err = await rpc_error(worker.report(spec, data=b"never uploaded"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "result_sha256" in err.details()
    empty = pb.TaskSpec(task_id=spec.task_id, lease_id="")
    err = await rpc_error(worker.report(empty))
    assert err.details() == "lease_id: is empty"


# -------------------------------------------------------------------- long-poll


async def test_long_poll_returns_when_work_arrives(
    pool: PoolServer, pool_client: TaskQueueClient, worker: Worker
) -> None:
    waiting = asyncio.create_task(worker.poll(wait=30))

    async def poll_arrived() -> bool:
        return pool.stats.get_assigned_calls["node-1"] == 1

    await eventually(poll_arrived, "the long-poll to reach the pool")
    assert not waiting.done()
    task_id = await pool_client.submit(py_spec())
    specs = await asyncio.wait_for(waiting, GUARD)
    assert [s.task_id for s in specs] == [task_id]
    assert pool.stats.get_assigned_calls["node-1"] == 1


async def test_long_poll_bounded_by_max_wait(pool_factory: PoolFactory) -> None:
    pool = await pool_factory(max_wait=1)
    w = Worker(pool.address)
    await w.start()
    assert await asyncio.wait_for(w.poll(wait=30), GUARD) == []
    await w.close()


async def test_cancelled_long_poll_takes_no_lease(
    pool: PoolServer, pool_client: TaskQueueClient, worker: Worker
) -> None:
    call = worker.stub.GetAssignedTasks(
        pb.GetAssignedTasksRequest(node_id="node-1", free=BIG, max_tasks=1, wait_seconds=30),
        metadata=worker.md,
        timeout=GUARD + 30,
    )

    async def poll_arrived() -> bool:
        return pool.stats.get_assigned_calls["node-1"] == 1

    await eventually(poll_arrived, "the long-poll to reach the pool")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    await asyncio.sleep(0.1)  # let the server see the cancellation
    task_id = await pool_client.submit(py_spec())
    assert (await pool_client.get(task_id)).status == pb.TASK_STATUS_QUEUED
    assert [s.task_id for s in await worker.poll()] == [task_id]


# --------------------------------------------------------------------- capacity


async def test_capacity_and_capabilities(pool_client: TaskQueueClient, worker: Worker) -> None:
    ids = [await pool_client.submit(py_spec(memory=512 * MiB)) for _ in range(3)]
    free = pb.Resources(cpus=8, memory_bytes=1 * GiB, disk_bytes=100 * GiB)
    leased = await worker.poll(free=free)
    assert [s.task_id for s in leased] == ids[:2]
    assert (await pool_client.get(ids[2])).status == pb.TASK_STATUS_QUEUED
    # max_tasks bounds the hand-out too.
    more = await worker.poll(max_tasks=1)
    assert [s.task_id for s in more] == ids[2:]

    container = pb.TaskSpec(kind=pb.TASK_KIND_CONTAINER, image="alpine:3", argv=["true"])
    cid = await pool_client.submit(container)
    assert await worker.poll() == []  # registered with "process" only
    assert await worker.poll(capabilities=["process"]) == []
    assert [s.task_id for s in await worker.poll(capabilities=["docker"])] == [cid]


async def test_free_resources_are_validated(worker: Worker) -> None:
    err = await rpc_error(worker.poll(free=pb.Resources(cpus=-1)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("free:")


# ---------------------------------------------------------------------- leases


@pytest.mark.slow
async def test_lease_expiry_requeues_then_fails(pool_factory: PoolFactory) -> None:
    pool = await pool_factory(lease_timeout=1)
    client = TaskQueueClient(pool.address, timeout=GUARD)
    await client.login(USER, PASSWORD)
    w = Worker(pool.address)
    await w.start()
    task_id = await client.submit(py_spec(max_attempts=2))
    (first,) = await w.poll()
    assert first.attempt == 1

    async def requeued() -> bool:
        info = await client.get(task_id)
        return info.status == pb.TASK_STATUS_QUEUED and info.attempt == 2

    await eventually(requeued, "the expired lease to requeue the task")
    (second,) = await w.poll()
    assert second.attempt == 2 and second.lease_id != first.lease_id

    async def failed() -> bool:
        return (await client.get(task_id)).status == pb.TASK_STATUS_FAILED

    await eventually(failed, "the task to fail after its last attempt")
    info = await client.get(task_id)
    assert info.error == "lease expired 2 times; last on node node-1"
    assert await w.poll() == []
    await client.close()
    await w.close()


@pytest.mark.slow
async def test_heartbeat_keeps_lease_alive(pool_factory: PoolFactory) -> None:
    pool = await pool_factory(lease_timeout=1)
    client = TaskQueueClient(pool.address, timeout=GUARD)
    await client.login(USER, PASSWORD)
    w = Worker(pool.address)
    await w.start()
    task_id = await client.submit(py_spec())
    (spec,) = await w.poll()
    for _ in range(10):  # 2.5 s, well past the 1 s lease timeout
        reply = await w.heartbeat(spec)
        assert list(reply.lost_lease_ids) == []
        await asyncio.sleep(0.25)
    info = await client.get(task_id)
    assert info.status == pb.TASK_STATUS_RUNNING and info.attempt == 1
    assert (await w.report(spec)).recorded_status == pb.TASK_STATUS_SUCCEEDED
    await client.close()
    await w.close()


@pytest.mark.slow
async def test_stale_lease_is_refused(pool_factory: PoolFactory) -> None:
    pool = await pool_factory(lease_timeout=1)
    client = TaskQueueClient(pool.address, timeout=GUARD)
    await client.login(USER, PASSWORD)
    w = Worker(pool.address)
    await w.start()
    task_id = await client.submit(py_spec())
    (old,) = await w.poll()

    async def requeued() -> bool:
        return (await client.get(task_id)).status == pb.TASK_STATUS_QUEUED

    await eventually(requeued, "the lease to expire")
    err = await rpc_error(w.report(old))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert err.details() == f"lease {old.lease_id} is no longer current for task {task_id}"
    err = await rpc_error(w.upload(old, b"late"))
    assert err.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert pool.stats.reports_by_lease[old.lease_id] == 1
    assert pool.stats.stale_reports == 1
    assert list((await w.heartbeat(old)).lost_lease_ids) == [old.lease_id]

    (new,) = await w.poll()
    assert new.attempt == 2
    assert (await w.report(new)).recorded_status == pb.TASK_STATUS_SUCCEEDED
    await client.close()
    await w.close()


async def test_lease_counters_ignore_invalid_ids(
    pool: PoolServer, pool_client: TaskQueueClient, worker: Worker
) -> None:
    await pool_client.submit(py_spec())
    (spec,) = await worker.poll()
    for bad in ("not an id!", "x" * 100_000, ""):
        err = await rpc_error(worker.report(pb.TaskSpec(task_id=spec.task_id, lease_id=bad)))
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
        err = await rpc_error(
            worker.upload(pb.TaskSpec(task_id=spec.task_id, lease_id=bad), b"data")
        )
        assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    stats = pool.stats
    assert not stats.reports_by_lease and not stats.uploads_by_lease
    assert not stats.refused_uploads_by_lease

    counter = RecentCounter(maxlen=3)
    for key in ("a", "b", "a", "c", "d", "e"):
        counter[key] += 1
    assert dict(counter) == {"c": 1, "d": 1, "e": 1}


# ---------------------------------------------------------------------- uploads


async def test_upload_checks(pool_client: TaskQueueClient, worker: Worker) -> None:
    await pool_client.submit(py_spec(max_result_bytes=3 * MiB))
    (spec,) = await worker.poll()

    err = await rpc_error(worker.upload(spec, b"x" * (MiB + 1), chunk=MiB + 1))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("data:")

    err = await rpc_error(worker.upload(spec, b"hello", sha256="0" * 64))
    assert err.code() == grpc.StatusCode.DATA_LOSS

    err = await rpc_error(worker.upload(spec, b"hello", total_size=3))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    err = await rpc_error(worker.upload(spec, b"short", total_size=10))
    assert err.code() == grpc.StatusCode.DATA_LOSS

    # Refused at the header: nothing follows it (an accepted header would end in DATA_LOSS).
    big = b"y" * (3 * MiB + 1)
    err = await rpc_error(worker.upload(spec, b"", total_size=len(big), sha256=sha(big)))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "max_result_bytes" in err.details()
    # A header that under-states the size: refused at the first chunk, the last one sent.
    err = await rpc_error(worker.upload(spec, big[:MiB], total_size=10))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT

    async def data_first() -> AsyncIterator[pb.UploadTaskResultRequest]:
        yield pb.UploadTaskResultRequest(data=b"no header")

    err = await rpc_error(worker.stub.UploadTaskResult(data_first(), metadata=worker.md))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("header:")

    # After all that, a good upload still works.
    ok = b"z" * (3 * MiB)
    assert (await worker.upload(spec, ok)).size == len(ok)
    assert (await worker.report(spec, data=ok)).ack


def upload_messages(
    w: Worker, spec: pb.TaskSpec, data: bytes, hold_at: int, release: asyncio.Event
) -> AsyncIterator[pb.UploadTaskResultRequest]:
    """An upload of `data` in 1 MiB chunks that waits for `release` after `hold_at` bytes."""

    async def messages() -> AsyncIterator[pb.UploadTaskResultRequest]:
        yield pb.UploadTaskResultRequest(
            header=pb.UploadHeader(
                node_id=w.node_id,
                task_id=spec.task_id,
                lease_id=spec.lease_id,
                total_size=len(data),
                sha256=hashlib.sha256(data).hexdigest(),
            )
        )
        for i in range(0, len(data), MiB):
            if i == hold_at:
                await release.wait()
            yield pb.UploadTaskResultRequest(data=data[i : i + MiB])

    return messages()


def spool_files(pool: PoolServer) -> list[Path]:
    return sorted(pool.config.spool_path.glob("*"))


async def until(check: Callable[[], bool], what: str) -> None:
    async def check_async() -> bool:
        return check()

    await eventually(check_async, what)


async def test_a_new_upload_for_the_lease_supersedes_the_one_in_flight(
    pool: PoolServer, pool_client: TaskQueueClient, worker: Worker
) -> None:
    task_id = await pool_client.submit(py_spec())
    (spec,) = await worker.poll()
    data = bytes(range(256)) * (12 * 1024)  # 3 MiB
    release = asyncio.Event()
    first = asyncio.ensure_future(
        worker.stub.UploadTaskResult(
            upload_messages(worker, spec, data, 2 * MiB, release), metadata=worker.md, timeout=GUARD
        )
    )
    # The first upload is being spooled (two chunks written) and waits for its last chunk.
    await until(
        lambda: any(f.stat().st_size >= 2 * MiB for f in spool_files(pool)), "the first upload"
    )

    # The worker retries (its connection died, say): the new upload replaces the old one,
    # which is stopped and cleaned up, so one lease never has two uploads in flight.
    second = bytes(range(256)) * 4096  # 1 MiB
    up = await worker.upload(spec, second)
    assert (up.size, up.sha256) == (len(second), hashlib.sha256(second).hexdigest())
    err = await rpc_error(asyncio.wait_for(first, GUARD))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.ABORTED,
        "superseded by a newer upload for this lease",
    )
    release.set()
    assert (await worker.report(spec, data=second)).ack
    assert await pool_client.download(task_id) == second
    assert spool_files(pool) == []


async def two_leases_on_a_small_pool(
    pool_factory: PoolFactory,
) -> tuple[PoolServer, TaskQueueClient, Worker, pb.TaskSpec, pb.TaskSpec]:
    """A pool that receives at most 3 MiB of uploads at once, a signed-in submitter, and a
    worker holding the leases of the two tasks it submitted."""
    pool = await pool_factory(max_upload_bytes_in_flight=3 * MiB)
    client = TaskQueueClient(pool.address, timeout=GUARD)
    await client.login(USER, PASSWORD)
    w = Worker(pool.address)
    await w.start()
    for _ in range(2):
        await client.submit(py_spec())
    one, two = await w.poll()
    return pool, client, w, one, two


async def hold_an_upload(
    pool: PoolServer, w: Worker, spec: pb.TaskSpec, data: bytes, release: asyncio.Event
) -> asyncio.Future[pb.UploadTaskResultResponse]:
    """An upload of `data` for `spec` that stops after its first chunk until `release` is
    set, holding its room in the pool; returned once the pool has started spooling it."""
    call = asyncio.ensure_future(
        w.stub.UploadTaskResult(
            upload_messages(w, spec, data, MiB, release), metadata=w.md, timeout=GUARD
        )
    )
    await until(lambda: bool(spool_files(pool)), "the first upload to start")
    return call


def succeeded(spec: pb.TaskSpec, archive: Path, data: bytes) -> TaskResult:
    """The worker's result for `spec`: `data`, kept at `archive` (which may be missing)."""
    return TaskResult(
        task_id=spec.task_id,
        lease_id=spec.lease_id,
        status=TaskStatus.SUCCEEDED,
        archive=archive,
        archive_sha256=sha(data),
        archive_size=len(data),
    )


async def test_upload_bytes_in_flight_are_capped(
    pool_factory: PoolFactory,
) -> None:
    pool, client, w, one, two = await two_leases_on_a_small_pool(pool_factory)
    data = b"a" * (2 * MiB)
    release = asyncio.Event()
    first = await hold_an_upload(pool, w, one, data, release)

    # Both refused at the header, so nothing is sent after it (see Worker.upload).
    err = await rpc_error(w.upload(two, b"", total_size=len(data), sha256=sha(data)))
    assert err.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    details = err.details() or ""
    assert "retry later" in details and str(3 * MiB) in details
    assert pool.stats.refused_uploads_by_lease[two.lease_id] == 1
    huge = b"x" * (3 * MiB + 1)
    err = await rpc_error(w.upload(two, b"", total_size=len(huge), sha256=sha(huge)))
    assert err.code() == grpc.StatusCode.OUT_OF_RANGE  # never fits: not "retry later"
    assert (
        err.details() == f"{3 * MiB + 1} bytes is more than this pool receives at once ({3 * MiB})"
    )
    release.set()
    assert (await asyncio.wait_for(first, GUARD)).size == len(data)
    # The first upload's reservation is released: the second fits now.
    assert (await w.upload(two, data)).size == len(data)
    assert pool.stats.refused_uploads_by_lease[one.lease_id] == 0
    assert pool.stats.refused_uploads_by_lease[two.lease_id] == 2
    assert spool_files(pool) == []
    await client.close()
    await w.close()


# Enough tries to meet the race: the old upload took gRPC's INTERNAL for a refusal within 200.
ATTEMPTS = 200


async def test_a_busy_pool_refusing_the_workers_upload_means_send_it_again(
    pool_factory: PoolFactory, tmp_path: Path
) -> None:
    """The worker's own upload, while the pool has no room: every refusal reads as "try again"
    (the pool's RESOURCE_EXHAUSTED, or gRPC's INTERNAL when the refusal cut a chunk short),
    never as a refused result, which would make the worker drop a good one."""
    pool, client, w, one, two = await two_leases_on_a_small_pool(pool_factory)
    held = b"a" * (2 * MiB)
    release = asyncio.Event()
    first = await hold_an_upload(pool, w, one, held, release)

    data = b"r" * (2 * MiB + 17)  # three chunks after the header, racing the refusal
    archive = tmp_path / "result.tar.gz"
    archive.write_bytes(data)
    result = succeeded(two, archive, data)
    worker_client = NodePoolClient(pool.address, token=w.token)
    for _ in range(ATTEMPTS):
        with pytest.raises(PoolUnavailable):
            await worker_client.upload(w.node_id, result)
    assert pool.stats.refused_uploads_by_lease[two.lease_id] == ATTEMPTS
    release.set()
    assert (await asyncio.wait_for(first, GUARD)).size == len(held)
    await worker_client.upload(w.node_id, result)  # room again: it goes through
    assert (await w.report(two, data=data)).ack
    assert await client.download(two.task_id) == data
    await worker_client.close()
    await client.close()
    await w.close()


async def test_an_upload_the_worker_cannot_finish_frees_the_pools_room(
    pool_factory: PoolFactory, tmp_path: Path
) -> None:
    """The worker's result archive goes missing after the header went out: the call ends at
    once, so the pool's reservation is freed for other uploads (not held until its timeout)."""
    pool, client, w, one, two = await two_leases_on_a_small_pool(pool_factory)
    data = b"m" * (2 * MiB)

    worker_client = NodePoolClient(pool.address, token=w.token)
    with pytest.raises(FileNotFoundError):
        await worker_client.upload(w.node_id, succeeded(one, tmp_path / "gone.tar.gz", data))
    present = tmp_path / "result.tar.gz"
    present.write_bytes(data)

    async def second_fits() -> bool:
        try:
            await worker_client.upload(w.node_id, succeeded(two, present, data))
        except PoolUnavailable:
            return False  # the first one's 2 MiB are still reserved
        return True

    await eventually(second_fits, "the pool to free the unfinished upload's room")
    assert spool_files(pool) == []
    await worker_client.close()
    await client.close()
    await w.close()


async def test_cancelled_upload_leaves_nothing_behind(
    pool: PoolServer, pool_client: TaskQueueClient, worker: Worker
) -> None:
    await pool_client.submit(py_spec())
    (spec,) = await worker.poll()
    data = b"c" * (3 * MiB)

    # Cancelled while receiving: the spool file goes, the lease can upload again.
    never = asyncio.Event()
    call = worker.stub.UploadTaskResult(
        upload_messages(worker, spec, data, 2 * MiB, never), metadata=worker.md, timeout=GUARD
    )
    await until(lambda: any(f.stat().st_size >= 2 * MiB for f in spool_files(pool)), "spooled data")
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, GUARD)
    await until(lambda: spool_files(pool) == [], "the spool file to be removed")
    assert pool.stats.refused_uploads_by_lease[spec.lease_id] == 0

    # Cancelled while the spooled data is moved into the database: the spool file and the
    # chunks already written go too.
    storing = asyncio.Event()

    async def hook(lease_id: str, seq: int) -> None:
        if seq == 1:
            storing.set()
            await asyncio.sleep(GUARD)  # until the cancel arrives

    assert pool._core is not None
    pool._core.before_result_chunk = hook
    call = worker.stub.UploadTaskResult(
        upload_messages(worker, spec, data, -1, never), metadata=worker.md, timeout=GUARD
    )
    await asyncio.wait_for(storing.wait(), GUARD)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(call, GUARD)
    await until(lambda: spool_files(pool) == [], "the spool file to be removed")

    def chunks_left() -> int:
        return int(pool.store._db.execute("SELECT count(*) FROM blob_chunks").fetchone()[0])

    await until(lambda: chunks_left() == 0, "the reaper to free the partial result")
    pool._core.before_result_chunk = None
    assert pool.stats.refused_uploads_by_lease[spec.lease_id] == 0

    up = await worker.upload(spec, data)
    assert up.size == len(data)
    assert (await worker.report(spec, data=data)).ack
    assert pool.store.result_bytes(spec.task_id) == data


async def test_large_upload_does_not_stall_heartbeats(
    pool: PoolServer, pool_client: TaskQueueClient, worker: Worker
) -> None:
    other = Worker(pool.address, node_id="node-2")
    await other.start()
    task_id = await pool_client.submit(py_spec())
    (spec,) = await worker.poll()
    data = hashlib.sha256(b"seed").digest() * (20 * MiB // 32) + b"odd tail"  # 20 MiB + 8
    storing, heartbeat_done = asyncio.Event(), asyncio.Event()

    async def hook(lease_id: str, seq: int) -> None:
        if seq == 0:
            storing.set()
        if seq == 15:  # keep the store from finishing before the heartbeat could answer
            await asyncio.wait_for(heartbeat_done.wait(), GUARD)

    assert pool._core is not None
    pool._core.before_result_chunk = hook
    upload = asyncio.ensure_future(worker.upload(spec, data))
    await asyncio.wait_for(storing.wait(), GUARD)
    reply = await asyncio.wait_for(other.heartbeat(), GUARD)
    assert reply.ack
    assert not upload.done()  # the heartbeat was answered while the result was being stored
    heartbeat_done.set()
    up = await asyncio.wait_for(upload, GUARD)
    digest = hashlib.sha256(data).hexdigest()
    assert (up.size, up.sha256) == (len(data), digest)
    assert (await worker.report(spec, data=data)).ack
    stored = pool.store.result_bytes(task_id)
    assert stored is not None and hashlib.sha256(stored).hexdigest() == digest
    assert stored == data
    assert await pool_client.download(task_id) == data
    assert spool_files(pool) == []
    await other.close()


# ---------------------------------------------------------------------- cancel


async def test_cancel_queued_and_running(pool_client: TaskQueueClient, worker: Worker) -> None:
    queued = await pool_client.submit(py_spec("later"))
    assert await pool_client.cancel(queued) == pb.TASK_STATUS_CANCELLED
    assert (await pool_client.get(queued)).status == pb.TASK_STATUS_CANCELLED
    assert await worker.poll() == []

    running = await pool_client.submit(py_spec("now"))
    other = await pool_client.submit(py_spec("other"))
    spec, other_spec = await worker.poll()
    assert spec.task_id == running
    assert await pool_client.cancel(running, reason="changed my mind") == pb.TASK_STATUS_RUNNING
    info = await pool_client.get(running)
    assert info.status == pb.TASK_STATUS_RUNNING and info.cancel_requested
    beat = await worker.heartbeat(spec, other_spec)
    assert list(beat.cancel_task_ids) == [running]
    ack = await worker.report(spec, status=pb.TASK_STATUS_CANCELLED)
    assert ack.recorded_status == pb.TASK_STATUS_CANCELLED
    assert (await pool_client.get(running)).status == pb.TASK_STATUS_CANCELLED
    assert list((await worker.heartbeat(other_spec)).cancel_task_ids) == []

    # Cancel wins over a late success.
    assert await pool_client.cancel(other) == pb.TASK_STATUS_RUNNING
    ack = await worker.report(other_spec, status=pb.TASK_STATUS_SUCCEEDED)
    assert ack.recorded_status == pb.TASK_STATUS_CANCELLED


async def test_tasks_are_private_to_their_owner(
    pool: PoolServer, pool_client: TaskQueueClient
) -> None:
    task_id = await pool_client.submit(py_spec())
    bob = TaskQueueClient(pool.address, timeout=GUARD)
    await bob.login("bob", PASSWORD)
    for call in (bob.get(task_id), bob.cancel(task_id), bob.download(task_id)):
        err = await rpc_error(call)
        assert err.code() == grpc.StatusCode.NOT_FOUND
    assert await bob.list() == []
    err = await rpc_error(pool_client.download(task_id))
    assert (err.code(), err.details()) == (
        grpc.StatusCode.NOT_FOUND,
        f"task {task_id} has no result",
    )
    await bob.close()


# ------------------------------------------------------------------- bad specs


@pytest.mark.parametrize(
    ("spec", "field"),
    [
        (py_spec(input_files=[pb.InputFile(path="../x", content=b"")]), "input_files"),
        (py_spec(input_files=[pb.InputFile(path="/etc/passwd", content=b"")]), "input_files"),
        (py_spec(memory=-1), "resources"),
        (pb.TaskSpec(kind=pb.TASK_KIND_CONTAINER, image="alpine:3"), "argv"),
        (pb.TaskSpec(kind=pb.TASK_KIND_PYTHON, source="x" * (MiB + 1)), "source"),
        (pb.TaskSpec(source="print(1)"), "kind"),
        (py_spec(task_id="no spaces"), "task_id"),
        (py_spec(max_attempts=1000), "max_attempts"),
        (py_spec(network="host"), "network"),
    ],
)
async def test_bad_specs_are_invalid_argument(
    pool_client: TaskQueueClient, spec: pb.TaskSpec, field: str
) -> None:
    err = await rpc_error(pool_client.submit(spec))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith(f"{field}:"), err.details()


async def test_submit_edge_cases(pool: PoolServer, pool_client: TaskQueueClient) -> None:
    stub = pb_grpc.TaskQueueStub(grpc.aio.insecure_channel(pool.address))
    md = (("authorization", f"Bearer {pool_client.token}"),)
    err = await rpc_error(stub.SubmitTask(pb.SubmitTaskRequest(), metadata=md))
    assert (err.code(), err.details()) == (grpc.StatusCode.INVALID_ARGUMENT, "spec: is missing")
    assert await pool_client.submit(py_spec(task_id="mine-1")) == "mine-1"
    err = await rpc_error(pool_client.submit(py_spec(task_id="mine-1")))
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    err = await rpc_error(pool_client.get(""))
    assert err.details() == "task_id: is empty"
    err = await rpc_error(pool_client.list(statuses=[99]))  # type: ignore[list-item]
    assert err.details().startswith("statuses:")


# --------------------------------------------------------------------- restart


async def test_state_survives_restart(pool_factory: PoolFactory) -> None:
    first = await pool_factory()
    client = TaskQueueClient(first.address, timeout=GUARD)
    await client.login(USER, PASSWORD)
    token = client.token
    w = Worker(first.address)
    await w.start()
    running_id = await client.submit(py_spec("running"))
    (spec,) = await w.poll(max_tasks=1)
    queued_id = await client.submit(py_spec("queued"))
    await client.close()
    await w.close()
    await first.stop()

    second = await pool_factory()
    assert second.address != "" and second.port > 0
    client = TaskQueueClient(second.address, timeout=GUARD, token=token)
    info = await client.get(running_id)  # the old token still works
    assert info.status == pb.TASK_STATUS_RUNNING and info.spec.task_id == running_id
    assert (await client.get(queued_id)).status == pb.TASK_STATUS_QUEUED

    w = Worker(second.address)
    w.token = token or ""
    # No re-registration: the node is remembered, and the lease is still honoured.
    assert list((await w.heartbeat(spec)).lost_lease_ids) == []
    assert [s.task_id for s in await w.poll()] == [queued_id]
    assert (await w.report(spec)).recorded_status == pb.TASK_STATUS_SUCCEEDED
    assert (await client.get(running_id)).status == pb.TASK_STATUS_SUCCEEDED
    await client.close()
    await w.close()


# ------------------------------------------------------------------------- TLS


async def test_plaintext_refused_off_loopback(tmp_path: Path) -> None:
    server = PoolServer(PoolConfig(db_path=tmp_path / "p.db", listen="0.0.0.0:0"))
    with pytest.raises(PoolStartError, match="plaintext"):
        await server.start()


async def test_tls_pool(pool_factory: PoolFactory, tmp_path: Path) -> None:
    cert, key = _self_signed(tmp_path)
    pool = await pool_factory(tls_cert=cert, tls_key=key)
    client = TaskQueueClient(pool.address, timeout=GUARD, root_certificates=cert.read_bytes())
    assert client.tls
    await client.login(USER, PASSWORD)
    assert await client.list() == []
    await client.close()
    plain = TaskQueueClient(pool.address, timeout=2.0, tls=False)
    err = await rpc_error(plain.login(USER, PASSWORD))
    assert err.code() == grpc.StatusCode.UNAVAILABLE
    await plain.close()


def _self_signed(folder: Path) -> tuple[Path, Path]:
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "pool.crt", folder / "pool.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


# --------------------------------------------------------------- many tasks in one call


async def test_many_tasks_in_one_call_are_queued_in_order_in_one_transaction(
    pool: PoolServer, pool_client: TaskQueueClient
) -> None:
    writes = pool.store.write_transactions
    specs = [py_spec(f"sweep {n}") for n in range(50)] + [py_spec(task_id="named-one")]
    ids = await pool_client.submit_many(specs)
    assert pool.store.write_transactions - writes == 1
    assert len(ids) == 51 and len(set(ids)) == 51 and ids[-1] == "named-one"
    for n in (0, 17, 49):
        assert (await pool_client.get(ids[n])).spec.name == f"sweep {n}"
    worker = Worker(pool.address)
    await worker.start()
    assert [s.task_id for s in await worker.poll(max_tasks=100)] == ids  # oldest first


async def test_a_batch_wakes_a_parked_poll_for_each_task(
    pool: PoolServer, pool_client: TaskQueueClient
) -> None:
    workers = [Worker(pool.address, f"node-{n}") for n in range(3)]
    for worker in workers:
        await worker.start()
    parked = [asyncio.ensure_future(w.poll(max_tasks=1, wait=int(GUARD))) for w in workers]
    core = pool._core
    assert core is not None
    await eventually(_async_true(lambda: len(core.waiters) == 3), "the polls to park")
    ids = await pool_client.submit_many([py_spec(f"t{n}") for n in range(3)])
    got = [spec.task_id for poll in await asyncio.gather(*parked) for spec in poll]
    assert sorted(got) == sorted(ids)  # each woken poll took one, none left waiting


async def test_a_bad_spec_in_a_batch_is_named_and_nothing_is_queued(
    pool: PoolServer, pool_client: TaskQueueClient
) -> None:
    specs = [py_spec("fine"), py_spec("fine too"), py_spec("bad", max_attempts=1000)]
    err = await rpc_error(pool_client.submit_many(specs))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details().startswith("specs[2]: max_attempts: must be at most")
    bad_kind = pb.TaskSpec(kind=pb.TASK_KIND_PYTHON)  # no source
    err = await rpc_error(pool_client.submit_many([py_spec(), bad_kind]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details().startswith("specs[1]: ")
    err = await rpc_error(pool_client.submit_many([]))
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT and err.details() == "specs: is empty"
    err = await rpc_error(pool_client.submit_many([py_spec()] * 1001))
    assert err.details() == "specs: at most 1000 a call, not 1001"
    assert await pool_client.list() == []


async def test_a_batch_with_a_taken_id_is_refused_whole_naming_the_id(
    pool: PoolServer, pool_client: TaskQueueClient
) -> None:
    await pool_client.submit(py_spec(task_id="taken"))
    err = await rpc_error(
        pool_client.submit_many([py_spec(task_id="new-1"), py_spec(task_id="taken")])
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS
    assert "taken" in err.details()
    err = await rpc_error(
        pool_client.submit_many([py_spec(task_id="twice"), py_spec(task_id="twice")])
    )
    assert err.code() == grpc.StatusCode.ALREADY_EXISTS and "twice" in err.details()
    assert [t.spec.task_id for t in await pool_client.list()] == ["taken"]


def _async_true(check: Callable[[], bool]) -> Callable[[], Awaitable[bool]]:
    async def wrapped() -> bool:
        return check()

    return wrapped


# ---------------------------------------------------------------- garbage collection


async def test_while_serving_the_pool_runs_the_full_collections_at_its_own_pace(
    pool_factory: PoolFactory,
) -> None:
    """CPython's own rule paused a 10,000-worker pool for 0.5 s every few seconds; the pool
    collects the oldest generation itself, and cyclic garbage there is still freed."""
    before = gc.get_threshold()
    pool = await pool_factory(full_collection_every=0.5)
    assert gc.get_threshold()[:2] == before[:2] and gc.get_threshold()[2] >= 10**9

    class Node:
        other: object = None

    a, b = Node(), Node()
    a.other, b.other = b, a  # a cycle: only the collector frees it
    gone = weakref.ref(a)
    gc.collect(1)
    gc.collect(1)  # promoted to the oldest generation, where only a full collection looks
    del a, b
    for _ in range(100):  # bounded: the reaper's pass, every 0.2 s, collects every 0.5 s
        if gone() is None:
            break
        await asyncio.sleep(0.05)
    assert gone() is None and pool.collections.runs >= 1
    await pool.stop(0)
    assert gc.get_threshold() == before  # CPython's rule again once no pool serves
