"""Leases and heartbeats kept in memory, over real gRPC: what a worker sees, and across a crash.

The pool answers a heartbeat from memory and writes renewals once per reaper pass
(pool/heartbeats.py). These tests check what a person running workers relies on: a worker
that keeps heartbeating keeps its lease, one that stops loses it after the lease timeout, and
a crash of the pool process (SIGKILL, so nothing noted in memory is written) followed by a
restart re-queues no lease of a worker that is still alive, as docs/pool.md promises.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import grpc
import pytest

from hivemind_worker.pool.client import TaskQueueClient
from hivemind_worker.pool.server import PoolConfig, PoolServer
from hivemind_worker.pool.store import PoolStore
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc
from hivemind_worker.tasks import GiB

pytestmark = [pytest.mark.timeout(120), pytest.mark.slow]

USER, PASSWORD = "alice", "correct horse"
BIG = pb.Resources(cpus=64, memory_bytes=64 * GiB, disk_bytes=1024 * GiB)
GUARD = 20.0  # a hang guard only; nothing here asserts on durations


class Worker:
    """Raw stubs: the test decides exactly when this worker heartbeats."""

    def __init__(self, address: str, node_id: str, token: str = "") -> None:
        self.node_id = node_id
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.NodeManagerStub(self.channel)
        self.token = token

    @property
    def md(self) -> tuple[tuple[str, str], ...]:
        return (("authorization", f"Bearer {self.token}"),)

    async def start(self) -> None:
        reply = await self.stub.Login(
            pb.LoginRequest(username=USER, password=PASSWORD), timeout=GUARD
        )
        self.token = reply.token
        await self.stub.RegisterNode(
            pb.RegisterNodeRequest(node_id=self.node_id, capabilities=["process"]),
            metadata=self.md,
            timeout=GUARD,
        )

    async def poll(self) -> list[pb.TaskSpec]:
        reply = await self.stub.GetAssignedTasks(
            pb.GetAssignedTasksRequest(node_id=self.node_id, free=BIG, max_tasks=1),
            metadata=self.md,
            timeout=GUARD,
        )
        return list(reply.tasks)

    async def heartbeat(self, *specs: pb.TaskSpec) -> list[str]:
        reply = await self.stub.UpdateNodeStatus(
            pb.UpdateNodeStatusRequest(
                node_id=self.node_id,
                status=pb.NODE_STATUS_BUSY,
                running=[pb.RunningTask(task_id=s.task_id, lease_id=s.lease_id) for s in specs],
            ),
            metadata=self.md,
            timeout=GUARD,
        )
        return list(reply.lost_lease_ids)

    async def report(self, spec: pb.TaskSpec) -> pb.TaskStatus.ValueType:
        reply = await self.stub.ReportTaskResult(
            pb.ReportTaskResultRequest(
                node_id=self.node_id,
                task_id=spec.task_id,
                lease_id=spec.lease_id,
                status=pb.TASK_STATUS_SUCCEEDED,
            ),
            metadata=self.md,
            timeout=GUARD,
        )
        return reply.recorded_status

    async def close(self) -> None:
        await self.channel.close()


def py_spec(name: str) -> pb.TaskSpec:
    return pb.TaskSpec(kind=pb.TASK_KIND_PYTHON, source="print('hi')", name=name)


async def eventually(check: Callable[[], Awaitable[bool]], what: str) -> None:
    """Poll `check` until true, bounded by the hang guard."""
    try:
        async with asyncio.timeout(GUARD):
            while True:
                if await check():
                    return
                await asyncio.sleep(0.05)
    except TimeoutError:
        raise AssertionError(f"timed out waiting for {what}") from None


def add_user(db: Path) -> None:
    store = PoolStore(db)
    if store.password_hash(USER) is None:
        store.add_user(USER, PASSWORD)
    store.close()


@pytest.fixture
async def pools(tmp_path: Path) -> AsyncIterator[list[PoolServer]]:
    started: list[PoolServer] = []
    yield started
    for pool in started:
        await pool.stop(0)


async def start_pool(db: Path, started: list[PoolServer], **config: object) -> PoolServer:
    add_user(db)
    pool = PoolServer(PoolConfig(db_path=db, listen="127.0.0.1:0", **config))  # type: ignore[arg-type]
    await pool.start()
    started.append(pool)
    return pool


async def test_a_beating_worker_keeps_its_lease_and_a_silent_one_loses_it(
    tmp_path: Path, pools: list[PoolServer]
) -> None:
    pool = await start_pool(tmp_path / "pool.db", pools, lease_timeout=1, reaper_interval=0.2)
    client = TaskQueueClient(pool.address, timeout=GUARD)
    await client.login(USER, PASSWORD)
    alive, silent = Worker(pool.address, "alive"), Worker(pool.address, "silent")
    await alive.start()
    await silent.start()
    kept_id = await client.submit(py_spec("kept"))
    (kept,) = await alive.poll()
    lost_id = await client.submit(py_spec("lost"))
    (dropped,) = await silent.poll()
    assert (kept.task_id, dropped.task_id) == (kept_id, lost_id)

    async def silent_lease_requeued() -> bool:
        assert await alive.heartbeat(kept) == []  # renewed from memory at every beat
        info = await client.get(lost_id)
        return info.status == pb.TASK_STATUS_QUEUED and info.attempt == 2

    # The silent worker's lease ends after the 1 s timeout; meanwhile the beating worker's
    # lease (the same timeout) lives on, renewed only in memory between reaper passes.
    await eventually(silent_lease_requeued, "the silent worker's lease to expire")
    info = await client.get(kept_id)
    assert info.status == pb.TASK_STATUS_RUNNING and info.attempt == 1
    assert await silent.heartbeat(dropped) == [dropped.lease_id]  # told it is gone
    assert await alive.report(kept) == pb.TASK_STATUS_SUCCEEDED
    assert pool.store.counters()["expired"] == 1
    await client.close()
    await alive.close()
    await silent.close()


CRASHING_POOL = textwrap.dedent(
    """
    import asyncio, sys
    from pathlib import Path
    from hivemind_worker.pool.server import PoolConfig, PoolServer

    async def main() -> None:
        # A reaper pass an hour away: nothing noted in memory is written before the kill.
        config = PoolConfig(
            db_path=Path(sys.argv[1]), listen="127.0.0.1:0", lease_timeout=int(sys.argv[2]),
            reaper_interval=3600,
        )
        pool = PoolServer(config)
        await pool.start()
        print(pool.port, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())
    """
)


def stored_expiry(db: Path, task_id: str) -> int:
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as reader:
        row = reader.execute(
            "SELECT lease_expires_ms FROM tasks WHERE task_id = ?", (task_id,)
        ).fetchone()
    return int(row[0])


async def test_after_a_crash_and_restart_live_workers_keep_their_leases(
    tmp_path: Path, pools: list[PoolServer]
) -> None:
    db = tmp_path / "pool.db"
    add_user(db)
    lease_timeout = 2
    child = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        CRASHING_POOL,
        str(db),
        str(lease_timeout),
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "GRPC_ENABLE_FORK_SUPPORT": "false"},
    )
    try:
        assert child.stdout is not None
        port = int(await asyncio.wait_for(child.stdout.readline(), GUARD))
        address = f"127.0.0.1:{port}"
        client = TaskQueueClient(address, timeout=GUARD)
        await client.login(USER, PASSWORD)
        token = client.token or ""
        alive, gone = Worker(address, "alive"), Worker(address, "gone")
        await alive.start()
        await gone.start()
        kept_id = await client.submit(py_spec("kept"))
        (kept,) = await alive.poll()
        lost_id = await client.submit(py_spec("lost"))
        (dropped,) = await gone.poll()
        assert (kept.task_id, dropped.task_id) == (kept_id, lost_id)
        await client.close()
        first_expiry = stored_expiry(db, kept_id)

        # Beat until the lease's stored expiry has passed: only memory says it is renewed.
        async def stored_lease_ran_out() -> bool:
            assert await alive.heartbeat(kept) == []
            return time.time() * 1000 > first_expiry + 100

        await eventually(stored_lease_ran_out, "the stored expiry to pass")
        child.send_signal(signal.SIGKILL)  # a crash: no stop, no flush
        await asyncio.wait_for(child.wait(), GUARD)
        await alive.close()
        await gone.close()
    finally:
        if child.returncode is None:
            child.kill()
            await asyncio.wait_for(child.wait(), GUARD)
    # The crash lost the renewals: the file still holds the lease's first expiry, now past.
    assert stored_expiry(db, kept_id) == first_expiry < time.time() * 1000

    pool = await start_pool(db, pools, lease_timeout=lease_timeout, reaper_interval=0.2)
    client = TaskQueueClient(pool.address, timeout=GUARD, token=token)
    alive = Worker(pool.address, "alive", token)  # reconnects; the "gone" worker never does
    writes = pool.store.write_transactions

    async def reaper_passed_twice() -> bool:  # each pass writes one transaction, at least
        return pool.store.write_transactions >= writes + 2

    # The live worker comes back only after the reaper has looked at its expired lease: the
    # restart's grace, not a quick heartbeat, is what must keep it.
    await eventually(reaper_passed_twice, "two reaper passes")

    async def gone_lease_requeued() -> bool:
        assert await alive.heartbeat(kept) == []  # within the grace window, then renewed
        info = await client.get(lost_id)
        return info.status == pb.TASK_STATUS_QUEUED and info.attempt == 2

    # The worker that did not come back loses its lease once the restart's grace has passed;
    # all that time the reaper ran every 0.2 s and left the live worker's lease alone.
    await eventually(gone_lease_requeued, "the absent worker's lease to expire")
    info = await client.get(kept_id)
    assert info.status == pb.TASK_STATUS_RUNNING and info.attempt == 1
    assert await alive.report(kept) == pb.TASK_STATUS_SUCCEEDED
    assert (await client.get(kept_id)).status == pb.TASK_STATUS_SUCCEEDED
    await client.close()
    await alive.close()
