"""A growing fleet slows its heartbeats: the pool's rate stays bounded, and leases last longer.

A real pool on loopback, a real worker engine and raw gRPC clients standing in for the rest
of the fleet. The pool is set to one heartbeat a second at most, so a handful of workers is
a fleet large enough to stretch the pace (pace.py)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest

from helpers.harness import (
    login_token,
    python_task,
    queue_client,
    start_pool,
    start_worker,
    wait_for,
)
from hivemind_worker.pool.records import now_ms
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc
from hivemind_worker.tasks import TaskStatus

pytestmark = [pytest.mark.usefixtures("memory_keyring"), pytest.mark.timeout(120)]

GUARD = 30.0  # a hang guard only
ONE_A_SECOND = {"heartbeat_interval": 1, "lease_timeout": 4, "max_heartbeats_per_second": 1}


class Others:
    """Workers of the same fleet, as raw clients: they register and poll, nothing else."""

    def __init__(self, address: str, token: str) -> None:
        self.channel = grpc.aio.insecure_channel(address)
        self.stub = pb_grpc.NodeManagerStub(self.channel)
        self.metadata = (("authorization", f"Bearer {token}"),)

    async def register(self, node_id: str) -> pb.RegisterNodeResponse:
        return await self.stub.RegisterNode(
            pb.RegisterNodeRequest(node_id=node_id, capabilities=["process"]),
            metadata=self.metadata,
            timeout=GUARD,
        )

    async def keep_beating(self, node_ids: list[str]) -> None:
        """Heartbeat for `node_ids` every second until cancelled: they stay live workers."""
        while True:
            for node_id in node_ids:
                await self.stub.UpdateNodeStatus(
                    pb.UpdateNodeStatusRequest(node_id=node_id, status=pb.NODE_STATUS_IDLE),
                    metadata=self.metadata,
                    timeout=GUARD,
                )
            await asyncio.sleep(1)


@pytest.fixture
async def others_factory() -> AsyncIterator[list[Others]]:
    made: list[Others] = []
    yield made
    for others in made:
        await others.channel.close()


async def test_a_growing_fleet_slows_the_workers_beats_and_their_leases_last_as_many_beats(
    tmp_path: Path, others_factory: list[Others], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="hivemind_worker")
    pool = await start_pool(tmp_path / "pool.db", **ONE_A_SECOND)
    token = await login_token(pool.address)
    others = Others(pool.address, token)
    others_factory.append(others)
    names = [f"other-{n}" for n in range(5)]
    for name in names:
        await others.register(name)
    # Live as long as the test runs, however slow the machine (silent ones are forgotten).
    beating = asyncio.create_task(others.keep_beating(names))
    # With this worker, six live workers at one beat a second: a beat every 6 s, and leases
    # of 24 s (four beats, as 4 s is to 1 s).
    worker = await start_worker(tmp_path / "node-a", pool.address, token=token)
    try:
        await wait_for(
            lambda: "the pool asks for a heartbeat every 6 s (was 1 s)" in caplog.text,
            GUARD,
            "the worker to take the slower pace",
        )
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                python_task("import time; time.sleep(2); open('results/r.txt', 'w').write('ok')")
            )
            await wait_for(
                lambda: (
                    (t := pool.store.get_task(task_id)) is not None
                    and t.status is TaskStatus.RUNNING
                ),
                GUARD,
                "the task to run",
            )
            running = pool.store.get_task(task_id)
            assert running is not None
            assert running.lease_expires_ms - now_ms() > 12_000  # the pace's 24 s, not 4 s
            info = (await queue.wait_done([task_id], timeout=GUARD))[task_id]
        assert info.status == pb.TASK_STATUS_SUCCEEDED and info.attempt == 1
    finally:
        beating.cancel()
        await asyncio.gather(beating, return_exceptions=True)
        await worker.stop()
        await pool.stop(0)


async def test_a_restarted_pool_gives_running_leases_the_time_their_slower_beats_need(
    tmp_path: Path, others_factory: list[Others]
) -> None:
    """Workers that were told to beat every 8 s keep their leases across a pool restart."""
    db = tmp_path / "pool.db"
    pool = await start_pool(db, **ONE_A_SECOND)
    others = Others(pool.address, await login_token(pool.address))
    others_factory.append(others)
    for n in range(8):
        await others.register(f"other-{n}")
    async with queue_client(pool.address) as queue:
        task_id = await queue.submit(python_task("print('hi')"))
    reply = await pb_grpc.NodeManagerStub(others.channel).GetAssignedTasks(
        pb.GetAssignedTasksRequest(
            node_id="other-0",
            free=pb.Resources(cpus=4, memory_bytes=4 << 30, disk_bytes=4 << 30),
            max_tasks=1,
            capabilities=["process"],
        ),
        metadata=others.metadata,
        timeout=GUARD,
    )
    assert [t.task_id for t in reply.tasks] == [task_id]
    await pool.stop(0)

    pool = await start_pool(db, **ONE_A_SECOND)
    try:
        leased = pool.store.get_task(task_id)
        assert leased is not None and leased.status is TaskStatus.RUNNING
        # Eight workers seen before the restart: a beat every 8 s, 32 s to come back.
        assert leased.lease_expires_ms - now_ms() > 20_000
        again = Others(pool.address, await login_token(pool.address))
        others_factory.append(again)
        assert (await again.register("newcomer")).heartbeat_interval_seconds >= 8
    finally:
        await pool.stop(0)
