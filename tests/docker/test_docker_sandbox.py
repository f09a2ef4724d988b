"""DockerExecutor against a hostile task: the disk request, 100,000 result files, entry names."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest

from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.engine.executors.workspace import wait_for_discards
from hivemind_worker.tasks import MiB, Resources, TaskKind, TaskResult, TaskSpec, TaskStatus

pytestmark = [pytest.mark.docker, pytest.mark.timeout(600)]

MakeExecutor = Callable[..., dockerx.DockerExecutor]


def make_task(source: str, task_id: str, *, disk: int = 64 * MiB, timeout: int = 300) -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        lease_id="lease-1",
        kind=TaskKind.PYTHON,
        resources=Resources(0.5, 256 * MiB, disk),
        timeout_seconds=timeout,
        source=source,
    )


class Ticker:
    """A heartbeat-like coroutine on the executor's loop, counting its ticks."""

    def __init__(self) -> None:
        self.ticks = 0
        self._stop = asyncio.Event()
        self._task = asyncio.create_task(self._beat())

    async def _beat(self) -> None:
        while not self._stop.is_set():
            self.ticks += 1
            await asyncio.sleep(0.005)

    async def stop(self) -> None:
        self._stop.set()
        await self._task


WRITER = (
    "import time\n"
    "for i in range({n}):\n"
    "    with open(f'out{{i}}.bin', 'wb') as f: f.write(bytes(1 << 20))\n"
    "    time.sleep(0.05)\n"
    "print('wrote all')\n"
)


async def test_disk_request_is_enforced_on_the_workspace(make_executor: MakeExecutor) -> None:
    executor = make_executor()
    over = make_task(WRITER.format(n=200), "disk-over", disk=8 * MiB)
    within = make_task(WRITER.format(n=3), "disk-within", disk=8 * MiB)
    results: list[TaskResult] = []
    for task in (over, within):
        await executor.prepare(task)
        results.append(await executor.run(task))
        await executor.cleanup(task.task_id)
    assert results[0].status is TaskStatus.FAILED, results[0]
    assert results[0].error == "used more than its 8 MiB disk limit"
    assert b"wrote all" not in results[0].log_tail
    assert results[1].status is TaskStatus.SUCCEEDED, results[1]


async def test_a_hundred_thousand_result_files_are_refused_promptly(
    make_executor: MakeExecutor,
) -> None:
    executor = make_executor()
    task = make_task(
        "for i in range(100_000):\n"
        "    open(f'results/f{i}', 'w').close()\n"
        "print('END-OF-TASK', flush=True)\n",
        "many-files",
        disk=1024 * MiB,
    )
    await executor.prepare(task)
    workspace = executor.workspace(task.task_id)
    assert workspace is not None
    ticker = Ticker()
    marked: list[int] = []

    def on_log(_task_id: str, chunk: bytes) -> None:
        if b"END-OF-TASK" in chunk:
            marked.append(ticker.ticks)

    try:
        result = await executor.run(task, on_log)
        after_task = ticker.ticks - marked[0] if marked else -1
        await executor.cleanup(task.task_id)
        gone_at_once = not workspace.exists()
        before = ticker.ticks
        emptied = await asyncio.to_thread(wait_for_discards, 300)
        while_deleting = ticker.ticks - before
    finally:
        await ticker.stop()
    assert result.status is TaskStatus.FAILED, result
    assert "more than 10000 files" in result.error
    # The loop kept ticking after the task's last words, while the results were looked at
    # (off the loop, up to the cap), and while the 100,000 files were deleted in the
    # background; cleanup() returned with the workspace already out of the way.
    assert after_task > 0
    assert gone_at_once
    assert emptied and while_deleting > 0


async def test_result_entries_follow_the_same_rule_as_the_process_sandbox(
    make_executor: MakeExecutor,
) -> None:
    executor = make_executor()
    task = make_task("open('results/..\\\\..\\\\escape', 'w').write('x')\n", "names")
    await executor.prepare(task)
    result = await executor.run(task)
    await executor.cleanup(task.task_id)
    assert result.status is TaskStatus.FAILED, result
    assert "backslashes" in result.error
    assert result.archive is None
