"""When to contribute with the Docker executor: the policy pauses containers and throttles them."""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import docker
import pytest

from helpers.desktop import write_battery
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
from hivemind_worker.engine.events import EngineState, PolicyChanged, TaskStarted
from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.engine.policy import Reason, Verdict
from hivemind_worker.engine.probes import DesktopProbes
from hivemind_worker.engine.probes.power import PowerProbe
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = [
    pytest.mark.docker,
    pytest.mark.usefixtures("memory_keyring"),
    pytest.mark.timeout(180),
]


def docker_executor(client: docker.DockerClient) -> Callable[[Settings], dockerx.DockerExecutor]:
    def make(settings: Settings) -> dockerx.DockerExecutor:
        return dockerx.DockerExecutor(
            client, settings.work_dir, settings.node_id, python_image=TEST_IMAGE,
            pull_policy="never",
        )  # fmt: skip

    return make


STEPS = """
    import hashlib, time
    digest = hashlib.sha256()
    for i in range(40):
        digest.update(str(i).encode())
        time.sleep(0.1)
    open("results/out.txt", "w").write(digest.hexdigest())
"""


def expected() -> bytes:
    digest = hashlib.sha256()
    for i in range(40):
        digest.update(str(i).encode())
    return digest.hexdigest().encode()


def containers(client: docker.DockerClient, node: str) -> list[dict]:  # type: ignore[type-arg]
    found = client.api.containers(filters={"label": f"{dockerx.LABEL_NODE}={node}"})
    return [client.api.inspect_container(c["Id"]) for c in found]


async def test_on_battery_pauses_the_container_and_plugged_in_finishes_it(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    power = tmp_path / "power_supply"
    write_battery(power, plugged=True, percent=90)
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(
        tmp_path / "dock-policy",
        pool.address,
        executor=docker_executor(docker_client),
        probes=DesktopProbes(power=PowerProbe(power)),
        other_cpu_percent=0,
        memory_low_percent=0,
    )
    node = "dock-policy"
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(python_task(STEPS))
            await wait_for(
                lambda: (
                    any(isinstance(e, TaskStarted) for e in worker.events)
                    and any(c["State"]["Running"] for c in containers(docker_client, node))
                ),
                60,
                "the container to run",
            )
            write_battery(power, plugged=False, percent=89)
            await wait_for(
                lambda: all(c["State"]["Paused"] for c in containers(docker_client, node)),
                30,
                "docker pause",
            )
            assert worker.engine.state is EngineState.WAITING
            changes = [e for e in worker.events if isinstance(e, PolicyChanged)]
            assert changes[-1].decision.reason is Reason.ON_BATTERY
            write_battery(power, plugged=True, percent=89)
            (info,) = (await queue.wait_done([task_id], timeout=90)).values()
            assert info.status == pb.TASK_STATUS_SUCCEEDED
            assert archive_files(await queue.download(task_id))["results/out.txt"] == expected()
    finally:
        await worker.stop()
        await pool.stop()


async def test_cpu_time_limit_lowers_a_running_containers_cpu_ceiling(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(
        tmp_path / "dock-share",
        pool.address,
        executor=docker_executor(docker_client),
        other_cpu_percent=0,
        memory_low_percent=0,
    )
    node = "dock-share"

    def ceilings() -> list[int]:
        return [c["HostConfig"]["NanoCpus"] for c in containers(docker_client, node)]

    try:
        async with queue_client(pool.address) as queue:
            spec = python_task("import time\ntime.sleep(60)\n")
            spec.resources.cpus = 1
            task_id = await queue.submit(spec)
            await wait_for(lambda: ceilings() == [1_000_000_000], 60, "the container")
            worker.engine.apply_settings(replace(worker.engine.settings, cpu_time_percent=25))
            await wait_for(lambda: ceilings() == [250_000_000], 30, "a quarter of a core")
            changes = [e for e in worker.events if isinstance(e, PolicyChanged)]
            assert changes[-1].decision.verdict is Verdict.THROTTLE
            worker.engine.apply_settings(replace(worker.engine.settings, cpu_time_percent=100))
            await wait_for(lambda: ceilings() == [1_000_000_000], 30, "the whole core again")
            await queue.cancel(task_id)
    finally:
        await worker.stop()
        await pool.stop()
