"""An image this computer cannot download: the person is told, the task goes elsewhere.

Issue 12, bug 7: without a reachable registry the first Docker task failed in 0.1 s with the
registry's raw text, counted as the task's failure, and nobody was told. The registry here
is a loopback port nobody listens on, so nothing leaves this machine.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import docker
import pytest

from helpers.harness import queue_client, start_pool, start_worker, wait_for
from helpers.images import TEST_IMAGE
from hivemind_worker.config import Settings
from hivemind_worker.engine.events import ErrorRaised, TaskFinished
from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.errors import ErrorKind
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import TaskStatus

pytestmark = [
    pytest.mark.docker,
    pytest.mark.usefixtures("memory_keyring"),
    pytest.mark.timeout(120),
]

UNREACHABLE = "127.0.0.1:1/hivemind/not-reachable:1"


async def test_an_image_that_cannot_be_pulled_is_told_and_the_task_goes_elsewhere(
    docker_client: docker.DockerClient, tmp_path: Path
) -> None:
    def make(settings: Settings) -> dockerx.DockerExecutor:
        return dockerx.DockerExecutor(
            docker_client, settings.work_dir, settings.node_id, python_image=TEST_IMAGE,
            pull_policy="if-not-present",
        )  # fmt: skip

    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node-a", pool.address, executor=make)
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                pb.TaskSpec(
                    kind=pb.TASK_KIND_CONTAINER,
                    image=UNREACHABLE,
                    argv=["true"],
                    resources=pb.Resources(cpus=0.5, memory_bytes=64 << 20),
                    timeout_seconds=60,
                )
            )
            await wait_for(
                lambda: any(isinstance(e, TaskFinished) for e in worker.events),
                what="the task to end here",
            )
            finished = next(e for e in worker.events if isinstance(e, TaskFinished))
            assert finished.status is TaskStatus.CANCELLED  # declined, not the task's failure
            told = [e for e in worker.events if isinstance(e, ErrorRaised)]
            assert [e.kind for e in told] == [ErrorKind.IMAGE_UNAVAILABLE]
            assert told[0].needs_action  # the tray notifies
            await asyncio.sleep(3)  # this worker keeps polling; it is not handed the task again
            info = await queue.get(task_id)
            assert info.status == pb.TASK_STATUS_QUEUED and info.attempt == 2
            assert sum(isinstance(e, TaskFinished) for e in worker.events) == 1
    finally:
        await worker.stop()
        await pool.stop()
