"""No thundering herd: a new task wakes one parked long-poll that can run it, and only that one."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc
import pytest

from hivemind_worker.pool.core import PollRequest
from hivemind_worker.pool.records import TaskNeed
from hivemind_worker.pool.server import PoolConfig, PoolServer
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc
from hivemind_worker.tasks import GiB, MiB, Resources, TaskSpec

pytestmark = pytest.mark.timeout(120)

USER, PASSWORD = "alice", "correct horse"
BIG = pb.Resources(cpus=8, memory_bytes=8 * GiB, disk_bytes=100 * GiB)
GUARD = 60.0  # a hang guard only; nothing here asserts on durations
POLLS = 1000


@pytest.fixture
async def pool(tmp_path: Path) -> AsyncIterator[PoolServer]:
    server = PoolServer(PoolConfig(db_path=tmp_path / "pool.db", listen="127.0.0.1:0", max_wait=30))
    await server.start()
    server.store.add_user(USER, PASSWORD)
    yield server
    await server.stop(0)


class Fleet:
    """Registered nodes on a few channels, parking long-polls on the pool."""

    def __init__(self, pool: PoolServer, channels: int) -> None:
        self.pool = pool
        self.channels = [grpc.aio.insecure_channel(pool.address) for _ in range(channels)]
        self.stubs = [pb_grpc.NodeManagerStub(c) for c in self.channels]
        self.queue = pb_grpc.TaskQueueStub(self.channels[0])
        self.metadata: tuple[tuple[str, str], ...] = ()

    async def login(self) -> None:
        reply = await self.stubs[0].Login(
            pb.LoginRequest(username=USER, password=PASSWORD), timeout=GUARD
        )
        self.metadata = (("authorization", f"Bearer {reply.token}"),)

    async def register(self, node_id: str, capabilities: list[str]) -> None:
        await self.stubs[0].RegisterNode(
            pb.RegisterNodeRequest(node_id=node_id, capabilities=capabilities),
            metadata=self.metadata,
            timeout=GUARD,
        )

    def poll(
        self, n: int, node_id: str, **fields: object
    ) -> asyncio.Task[pb.GetAssignedTasksResponse]:
        fields.setdefault("free", BIG)
        request = pb.GetAssignedTasksRequest(
            node_id=node_id, max_tasks=1, wait_seconds=30, **fields
        )  # type: ignore[arg-type]
        stub = self.stubs[n % len(self.stubs)]
        return asyncio.ensure_future(
            stub.GetAssignedTasks(request, metadata=self.metadata, timeout=GUARD)
        )

    async def submit(self, **spec: object) -> str:
        spec.setdefault("kind", pb.TASK_KIND_PYTHON)
        spec.setdefault("source", "print('hi')")
        reply = await self.queue.SubmitTask(
            pb.SubmitTaskRequest(spec=pb.TaskSpec(**spec)),  # type: ignore[arg-type]
            metadata=self.metadata,
            timeout=GUARD,
        )
        return str(reply.task_id)

    async def close(self) -> None:
        for channel in self.channels:
            await channel.close()


async def until(check: Callable[[], bool], what: str) -> None:
    for _ in range(int(GUARD / 0.02)):  # bounded: a hang guard, not a timing assertion
        if check():
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"never happened: {what}")


async def test_one_submit_with_a_thousand_parked_polls_wakes_one_and_runs_one_lease(
    pool: PoolServer,
) -> None:
    fleet = Fleet(pool, channels=10)
    try:
        await fleet.login()
        for n in range(POLLS):
            await fleet.register(f"node-{n}", ["process"])
        polls = [fleet.poll(n, f"node-{n}") for n in range(POLLS)]
        await until(lambda: pool.parked_polls == POLLS, f"{POLLS} polls parked")
        leases_before = pool.store.lease_transactions
        writes_before = pool.store.write_transactions

        task_id = await fleet.submit()

        # The wake-up happens inside SubmitTask: by its answer one poll has left the queue.
        assert pool.parked_polls == POLLS - 1
        assert pool.wakeups == 1
        done, _ = await asyncio.wait(polls, return_when=asyncio.FIRST_COMPLETED, timeout=GUARD)
        (answered,) = done
        assert [t.task_id for t in answered.result().tasks] == [task_id]
        # One lease transaction (the woken poll's), plus the submit's own: nothing for the rest.
        assert pool.store.lease_transactions - leases_before == 1
        assert pool.store.write_transactions - writes_before == 2
        assert pool.parked_polls == POLLS - 1
        assert sum(p.done() for p in polls) == 1
    finally:
        await fleet.close()
    await until(lambda: pool.parked_polls == 0, "cancelled polls leave the queue")


async def test_polls_that_cannot_run_the_task_are_not_woken_for_it(pool: PoolServer) -> None:
    fleet = Fleet(pool, channels=1)
    try:
        await fleet.login()
        for node in ("process-only", "small", "short", "offline", "able"):
            await fleet.register(node, ["process", "docker"])
        # Parked oldest first; each of the first four lacks one thing the task needs.
        small = pb.Resources(cpus=8, memory_bytes=64 * MiB, disk_bytes=100 * GiB)
        unable = {
            "process-only": fleet.poll(0, "process-only", capabilities=["process"]),
            "small": fleet.poll(0, "small", free=small),
            "short": fleet.poll(0, "short", max_timeout_seconds=60),
            "offline": fleet.poll(0, "offline", networks=[]),
        }
        await until(lambda: pool.parked_polls == 4, "4 polls parked")
        able = fleet.poll(0, "able", networks=["bridge"])
        await until(lambda: pool.parked_polls == 5, "5 polls parked")
        leases_before = pool.store.lease_transactions

        task_id = await fleet.submit(
            kind=pb.TASK_KIND_CONTAINER,
            source="",
            image="debian:bookworm-slim",
            argv=["true"],
            resources=pb.Resources(cpus=1, memory_bytes=512 * MiB),
            timeout_seconds=600,
            network="bridge",
        )

        assert [t.task_id for t in (await able).tasks] == [task_id]
        assert pool.wakeups == 1
        assert pool.store.lease_transactions - leases_before == 1
        assert pool.parked_polls == 4
        assert not any(p.done() for p in unable.values())

        # A task they can run wakes the oldest of them, and it alone.
        second = await fleet.submit()
        assert [t.task_id for t in (await unable["process-only"]).tasks] == [second]
        assert pool.wakeups == 2
        assert pool.parked_polls == 3
    finally:
        await fleet.close()


async def test_a_woken_poll_whose_caller_left_passes_its_task_to_the_next(
    pool: PoolServer,
) -> None:
    # The core, on the real store: a caller that cancels between its wake-up and its lease
    # must not strand the task it was woken for.
    core = pool._core
    assert core is not None
    node = pb.RegisterNodeRequest(node_id="n1", capabilities=["process"])
    for node_id in ("n1", "n2"):
        node.node_id = node_id
        pool.store.upsert_node(node_id, USER, node, ["process"])
    free = Resources(8, 8 * GiB, 100 * GiB, 0)

    def poll(node_id: str) -> asyncio.Task[list[pb.TaskSpec]]:
        request = PollRequest(node_id, free, 1, frozenset({"process"}), 0, frozenset({"none"}))
        return asyncio.ensure_future(core.lease_or_wait(request, 30))

    first, second = poll("n1"), poll("n2")
    await until(lambda: pool.parked_polls == 2, "2 polls parked")
    task = TaskSpec.from_proto(
        pb.TaskSpec(kind=pb.TASK_KIND_PYTHON, source="print(1)"), require_id=False
    )
    task_id = pool.store.submit(task, USER)
    core.offer(TaskNeed.of(task, task_id))
    assert pool.parked_polls == 1
    first.cancel()  # before it ran: it was woken, took no lease, and its caller is gone
    with pytest.raises(asyncio.CancelledError):
        await first
    (spec,) = await asyncio.wait_for(second, GUARD)
    assert spec.task_id == task_id
    assert pool.store.get_task(task_id).node_id == "n2"  # type: ignore[union-attr]


@pytest.mark.parametrize("how", ["lease expires", "worker gives it back"])
async def test_a_requeued_task_wakes_a_parked_poll(tmp_path: Path, how: str) -> None:
    # Without the offer on requeue, the parked poll would sit out its 30 s and come back
    # empty; with it, it is woken and leases the task's second attempt.
    config = PoolConfig(
        db_path=tmp_path / "pool.db", listen="127.0.0.1:0", lease_timeout=1, reaper_interval=0.2
    )
    pool = PoolServer(config)
    await pool.start()
    pool.store.add_user(USER, PASSWORD)
    fleet = Fleet(pool, channels=1)
    try:
        await fleet.login()
        for node in ("first", "second"):
            await fleet.register(node, ["process"])
        task_id = await fleet.submit()
        (spec,) = (await fleet.poll(0, "first")).tasks
        waiting = fleet.poll(0, "second")
        await until(lambda: pool.parked_polls == 1, "the second poll parked")
        wakeups = pool.wakeups
        if how == "worker gives it back":
            await fleet.stubs[0].ReportTaskResult(
                pb.ReportTaskResultRequest(
                    node_id="first",
                    task_id=task_id,
                    lease_id=spec.lease_id,
                    status=pb.TASK_STATUS_CANCELLED,
                ),
                metadata=fleet.metadata,
                timeout=GUARD,
            )
        # else: "first" sends no heartbeat, and the reaper expires its lease.
        (again,) = (await waiting).tasks
        assert (again.task_id, again.attempt) == (task_id, 2)
        assert again.lease_id != spec.lease_id
        assert pool.wakeups == wakeups + 1
    finally:
        await fleet.close()
        await pool.stop(0)
