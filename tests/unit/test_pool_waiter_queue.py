"""The waiter queue alone: oldest first, and only a poll that can run the task is woken."""

from __future__ import annotations

import asyncio

from hivemind_worker.pool.records import TaskNeed
from hivemind_worker.pool.waiters import Waiter, WaiterQueue
from hivemind_worker.tasks import GiB, MiB, Resources, TaskKind

BIG = Resources(8, 8 * GiB, 100 * GiB, 0)


def need(kind: TaskKind = TaskKind.PYTHON, memory: int = 0, timeout: int = 600) -> TaskNeed:
    return TaskNeed("t", kind, Resources(1, memory, 0, 0), timeout, "none")


def waiter(
    name: str, caps: set[str] | None = None, free: Resources = BIG, max_timeout: int = 0
) -> Waiter:
    return Waiter(name, free, frozenset(caps or {"process"}), max_timeout, frozenset({"none"}))


async def test_the_oldest_able_poll_is_woken_and_only_it() -> None:
    queue = WaiterQueue()
    polls = [
        waiter("docker-less", {"process"}),
        waiter("small", {"docker"}, free=Resources(8, 64 * MiB, 100 * GiB, 0)),
        waiter("short", {"docker"}, max_timeout=60),
        waiter("able-1", {"docker"}),
        waiter("able-2", {"docker"}),
    ]
    for p in polls:
        queue.park(p)

    woken = queue.offer(need(TaskKind.CONTAINER, memory=512 * MiB))

    assert woken is polls[3]
    assert [p.woken.done() for p in polls] == [False, False, False, True, False]
    assert len(queue) == 4 and queue.wakeups == 1
    assert queue.offer(need(TaskKind.CONTAINER, memory=512 * MiB)) is polls[4]
    assert queue.offer(need(TaskKind.CONTAINER, memory=512 * MiB)) is None  # nobody left able
    assert queue.offer(need(TaskKind.PYTHON)) is polls[0]
    assert len(queue) == 2


async def test_an_unparked_poll_is_never_woken() -> None:
    queue = WaiterQueue()
    first, second = waiter("a"), waiter("b")
    queue.park(first)
    queue.park(second)
    queue.unpark(first)
    assert queue.offer(need()) is second
    assert not first.woken.done()
    await asyncio.sleep(0)
