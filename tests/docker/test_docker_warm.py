"""Warm sandboxes on a real engine: re-attached after a crash, gone when the worker pauses or
stops (the lock-down and the slot hygiene are in test_docker_executor.py)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from helpers.harness import (
    archive_files,
    python_task,
    queue_client,
    start_pool,
    start_worker,
    wait_for,
)
from helpers.images import TEST_IMAGE
from hivemind_worker.config import Settings
from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import MiB, Resources, TaskKind, TaskSpec, TaskStatus

pytestmark = [pytest.mark.docker, pytest.mark.timeout(180)]

MakeExecutor = Callable[..., dockerx.DockerExecutor]
SHAPE = Resources(0.5, 96 * MiB, 32 * MiB)


def make_task(source: str, task_id: str) -> TaskSpec:
    return TaskSpec(
        task_id=task_id,
        lease_id="lease-1",
        kind=TaskKind.PYTHON,
        resources=SHAPE,
        timeout_seconds=60,
        source=source,
    )


def labels(client: docker.DockerClient, node: str) -> list[dict[str, str]]:
    found = client.containers.list(
        all=True, filters={"label": f"{dockerx.LABEL_NODE}={node}"}, ignore_removed=True
    )
    return [dict(c.labels) for c in found]


async def test_a_task_started_in_a_warm_sandbox_is_reattached_after_a_crash(
    make_executor: MakeExecutor, docker_client: docker.DockerClient, node_id: str
) -> None:
    first = make_executor(warm=True)
    assert first.warm is not None
    await first.prepare(make_task("pass", "warm-up"))
    assert (await first.run(make_task("pass", "warm-up"))).status is TaskStatus.SUCCEEDED
    await first.cleanup("warm-up")
    await asyncio.wait_for(first.settle(), 60)
    slow = make_task(
        "import time\nprint('slow here', flush=True)\ntime.sleep(3)\n"
        "open('results/out.txt', 'w').write('slow')\n",
        "slow",
    )
    await first.prepare(slow)
    slot, workspace = first.slot("slow"), first.workspace("slow")
    assert slot is not None and workspace is not None
    config = first.container_config(slow, workspace)
    # Started the way run() starts it, then `first` dies without a word.
    await asyncio.to_thread(first.warm.launch, slot, config["command"], config["environment"])

    second = make_executor(warm=True)
    assert await asyncio.to_thread(second.remove_leftovers) == 0
    assert second.adoptable() == [slow]
    result = await second.reattach(slow)
    assert result.status is TaskStatus.SUCCEEDED, result.error
    assert b"slow here" in result.log_tail
    assert result.archive is not None
    assert archive_files(result.archive.read_bytes()) == {"results/out.txt": b"slow"}
    await second.cleanup("slow")
    await asyncio.wait_for(second.settle(), 60)
    assert labels(docker_client, node_id) == []
    assert not workspace.exists()


def warm_executor(client: docker.DockerClient) -> Callable[[Settings], dockerx.DockerExecutor]:
    def make(settings: Settings) -> dockerx.DockerExecutor:
        return dockerx.DockerExecutor(
            client,
            settings.work_dir,
            settings.node_id,
            python_image=TEST_IMAGE,
            pull_policy="never",
            warm=True,
        )

    return make


@pytest.mark.usefixtures("memory_keyring")
async def test_pause_stop_and_shutdown_remove_the_warm_sandboxes(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    node = f"warm-{os.getpid()}"  # the worker's node id is its home folder's name
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(
        tmp_path / node, pool.address, executor=warm_executor(docker_client)
    )

    def warm_ones() -> list[dict[str, str]]:
        return [found for found in labels(docker_client, node) if dockerx.LABEL_SLOT in found]

    async def one_task() -> None:
        task_id = await queue.submit(python_task("open('results/ok.txt', 'w').write('ok')\n"))
        info = (await queue.wait_done([task_id], timeout=60))[task_id]
        assert info.status == pb.TASK_STATUS_SUCCEEDED, info.error
        # A fresh sandbox for the next task, and nothing else of the node's.
        await wait_for(lambda: len(warm_ones()) == 1, 60, "a warm sandbox")
        assert len(labels(docker_client, node)) == 1

    try:
        async with queue_client(pool.address) as queue:
            await one_task()
            worker.engine.pause()
            await wait_for(lambda: labels(docker_client, node) == [], 60, "removed on pause")
            worker.engine.resume()
            await one_task()
            worker.engine.stop()
            await wait_for(lambda: labels(docker_client, node) == [], 60, "removed on stop")
            worker.engine.start()
            await one_task()
    finally:
        await worker.stop()
        await pool.stop()
    assert labels(docker_client, node) == []  # shutdown leaves none behind
