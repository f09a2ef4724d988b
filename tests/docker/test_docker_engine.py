"""The worker engine with the Docker executor against the real pool: hostile tasks, caps, batch."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path

import docker
import pytest

from helpers.containers import remove_container
from helpers.harness import (
    archive_files,
    python_task,
    queue_client,
    run_checked_batch,
    start_pool,
    start_worker,
    wait_for,
    worker_subprocess,
)
from helpers.images import TEST_IMAGE
from hivemind_worker.config import Settings
from hivemind_worker.engine.events import ImagePull, ResultDelivered, TaskFinished
from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.engine.executors.images import ImageStore
from hivemind_worker.pool.server import PoolServer
from hivemind_worker.pool.store import PoolStore
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = [
    pytest.mark.docker,
    pytest.mark.usefixtures("memory_keyring"),
    pytest.mark.timeout(180),
]

MiB = 1 << 20
DOCKER_ENV = {
    "DOCKER_ENABLED": "true",
    "DOCKER_PYTHON_IMAGE": TEST_IMAGE,
    "DOCKER_PULL_POLICY": "never",
}


def docker_executor(
    client: docker.DockerClient, **options: object
) -> Callable[[Settings], dockerx.DockerExecutor]:
    def make(settings: Settings) -> dockerx.DockerExecutor:
        return dockerx.DockerExecutor(
            client,
            settings.work_dir,
            settings.node_id,
            python_image=TEST_IMAGE,
            pull_policy="never",
            **options,  # type: ignore[arg-type]
        )

    return make


def task(source: str, *, timeout: int = 0, memory: int = 0, cpus: float = 0.0) -> pb.TaskSpec:
    """The harness's python task with its own timeout and resources."""
    spec = python_task(source)
    if timeout:
        spec.timeout_seconds = timeout
    if memory:
        spec.resources.memory_bytes = memory
    if cpus:
        spec.resources.cpus = cpus
    return spec


def labelled(client: docker.DockerClient, node: str, *, running: bool = False) -> list[dict]:  # type: ignore[type-arg]
    filters: dict[str, object] = {"label": f"{dockerx.LABEL_NODE}={node}"}
    if running:
        filters["status"] = "running"
    return list(client.api.containers(all=not running, filters=filters))


async def running_container(client: docker.DockerClient, node: str) -> str:
    """The id of the node's first running task container, once there is one."""
    for _ in range(600):
        found = await asyncio.to_thread(labelled, client, node, running=True)
        if found:
            return str(found[0]["Id"])
        await asyncio.sleep(0.1)
    raise AssertionError("the worker never started a container")


def container_gone(client: docker.DockerClient, container_id: str) -> bool:
    try:
        client.containers.get(container_id)
    except docker.errors.NotFound:
        return True
    return False


async def test_worker_survives_hostile_tasks_and_takes_the_next(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(
        tmp_path / "node-h",
        pool.address,
        executor=docker_executor(docker_client, pids_limit=64),
    )
    try:
        async with queue_client(pool.address) as queue:
            fork_bomb = await queue.submit(
                task("import os\nwhile True:\n    os.fork()\n", timeout=20)
            )
            hog = await queue.submit(
                task(
                    "chunks = []\nwhile True:\n    chunks.append(bytearray(8 << 20))\n",
                    memory=64 * MiB,
                )
            )
            busy = await queue.submit(task("while True:\n    pass\n", timeout=3))
            infos = await queue.wait_done([fork_bomb, hog, busy], timeout=90)
            # The fork bomb hits the pids limit and dies of its own BlockingIOError.
            assert infos[fork_bomb].status == pb.TASK_STATUS_FAILED
            assert b"Resource temporarily unavailable" in infos[fork_bomb].log_tail
            assert infos[hog].status == pb.TASK_STATUS_OUT_OF_MEMORY
            assert infos[busy].status == pb.TASK_STATUS_TIMED_OUT

            after = await queue.submit(
                python_task("open('results/ok.txt', 'w').write('still here')\n")
            )
            info = (await queue.wait_done([after], timeout=60))[after]
            assert info.status == pb.TASK_STATUS_SUCCEEDED, info.error
            assert info.node_id == "node-h"
            assert archive_files(await queue.download(after)) == {"results/ok.txt": b"still here"}
        # Every container is removed once its result is delivered.
        await wait_for(lambda: not labelled(docker_client, "node-h"), 30, "containers removed")
    finally:
        await worker.stop()
        await pool.stop()


async def test_cancel_from_the_pool_kills_the_container(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(
        tmp_path / "node-x", pool.address, executor=docker_executor(docker_client)
    )
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(task("import time\ntime.sleep(120)\n"))
            await wait_for(
                lambda: bool(labelled(docker_client, "node-x", running=True)), 60, "container"
            )
            await queue.cancel(task_id, "changed my mind")
            info = (await queue.wait_done([task_id], timeout=60))[task_id]
            assert info.status == pb.TASK_STATUS_CANCELLED
        finished = [e for e in worker.events if isinstance(e, TaskFinished)]
        assert [e.status.value for e in finished] == ["cancelled"]
        await wait_for(lambda: not labelled(docker_client, "node-x"), 30, "container removed")
    finally:
        await worker.stop()
        await pool.stop()


class _PullingImages(ImageStore):
    """Reports a pull of the (local) Python image as if it came from a registry."""

    def _ensure_image(self, image: str) -> None:
        super()._ensure_image(image)
        self._report_pull(image, {"layer": (5 * MiB, 10 * MiB)}, finished=False)
        self._report_pull(image, {"layer": (10 * MiB, 10 * MiB)}, finished=True)


async def test_image_pull_progress_is_published_as_engine_events(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pool = await start_pool(tmp_path / "pool.db")

    def make(settings: Settings) -> dockerx.DockerExecutor:
        executor = dockerx.DockerExecutor(docker_client, settings.work_dir, settings.node_id)
        executor.images = _PullingImages(
            docker_client,
            settings.work_dir,
            python_image=TEST_IMAGE,
            pull_policy="never",
            on_progress=executor._pull_progress,
        )
        return executor

    worker = await start_worker(tmp_path / "node-p", pool.address, executor=make)
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(task("print('pulled and ran')\n"))
            info = (await queue.wait_done([task_id], timeout=60))[task_id]
            assert info.status == pb.TASK_STATUS_SUCCEEDED, info.error
        pulls = [e for e in worker.events if isinstance(e, ImagePull)]
        assert pulls == [
            ImagePull(TEST_IMAGE, 5 * MiB, 10 * MiB),
            ImagePull(TEST_IMAGE, 10 * MiB, 10 * MiB),
        ]
    finally:
        await worker.stop()
        await pool.stop()


async def test_running_tasks_never_exceed_the_memory_cap(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    # 512 MiB for all tasks: at most two of the 200 MiB tasks fit at once.
    worker = await start_worker(
        tmp_path / "node-c",
        pool.address,
        executor=docker_executor(docker_client),
        max_memory_gb=0.5,
        max_concurrent_tasks=4,
    )
    seen: list[int] = []
    limits: set[int] = set()
    stop = asyncio.Event()

    async def watch() -> None:
        while not stop.is_set():
            running = await asyncio.to_thread(labelled, docker_client, "node-c", running=True)
            seen.append(len(running))
            for item in running:
                try:
                    attrs = await asyncio.to_thread(docker_client.api.inspect_container, item["Id"])
                except docker.errors.NotFound:
                    continue  # ended and removed since the listing
                limits.add(attrs["HostConfig"]["Memory"])
            await asyncio.sleep(0.05)

    watcher = asyncio.create_task(watch())
    try:
        async with queue_client(pool.address) as queue:
            ids = [
                await queue.submit(
                    task("import time\ntime.sleep(2)\n", cpus=0.25, memory=200 * MiB)
                )
                for _ in range(6)
            ]
            infos = await queue.wait_done(ids, timeout=120)
            assert all(i.status == pb.TASK_STATUS_SUCCEEDED for i in infos.values())
    finally:
        stop.set()
        await watcher
        await worker.stop()
        await pool.stop()
    assert limits == {200 * MiB}
    assert max(seen) * 200 * MiB <= 512 * MiB
    assert max(seen) == 2  # the cap was used, not just respected


async def test_batch_of_tasks_end_to_end_through_docker(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(
        tmp_path / "node-d", pool.address, executor=docker_executor(docker_client)
    )
    try:
        async with queue_client(pool.address) as queue:
            await run_checked_batch(queue, "node-d", count=24, timeout=150)
        store = PoolStore(tmp_path / "pool.db")
        try:
            assert store.get_node("node-d", "alice").capabilities == frozenset({"docker"})
        finally:
            store.close()
        finished = [e for e in worker.events if isinstance(e, TaskFinished)]
        assert len(finished) == 24
        await wait_for(
            lambda: len([e for e in worker.events if isinstance(e, ResultDelivered)]) == 24,
            30,
            "deliveries",
        )
        await wait_for(lambda: not labelled(docker_client, "node-d"), 30, "containers removed")
    finally:
        await worker.stop()
        await pool.stop()


async def tear_down(
    procs: tuple[subprocess.Popen[bytes] | None, ...],
    client: docker.DockerClient,
    node: str,
    pool: PoolServer,
) -> None:
    """Kill the worker processes, remove the node's containers, stop the pool."""
    for proc in procs:
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(10)
    for item in labelled(client, node):
        remove_container(client, item["Id"])  # the worker may be removing it itself
    await pool.stop()


@pytest.mark.slow
async def test_killed_worker_leaves_a_container_the_next_start_removes(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """A container whose kept spec is gone cannot be re-attached: the next start removes it
    (and its workspace), and the pool re-queues the task when its lease expires."""
    pool = await start_pool(tmp_path / "pool.db")
    home = tmp_path / "node-k"
    first = await worker_subprocess(home, pool.address, env_overrides=DOCKER_ENV)
    second = None
    try:
        async with queue_client(pool.address) as queue:
            await queue.submit(task("import time\ntime.sleep(120)\n"))
            leftover = await running_container(docker_client, "node-k")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            # Killed without a word: its container runs on.
            assert docker_client.containers.get(leftover).status == "running"
            # The spec is kept beside the workspace, not in it; without it, no re-attaching.
            kept = list(home.rglob(f"{dockerx.SPECS_DIR}/*{dockerx.SPEC_SUFFIX}"))
            assert len(kept) == 1
            workspace = kept[0].parent.parent / kept[0].stem
            assert workspace.is_dir()
            kept[0].unlink()

            second = await worker_subprocess(home, pool.address, env_overrides=DOCKER_ENV)
            for _ in range(600):
                if await asyncio.to_thread(container_gone, docker_client, leftover):
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the leftover container was not removed at start")
            # The sweep is logged before the executor is chosen: wait for the choice's line
            # too (the container can be gone a moment before it is written).
            for _ in range(300):
                log = (home / "stderr.log").read_text()
                if "docker sandbox" in log:
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError(f"the worker did not choose the docker sandbox:\n{log}")
            assert "removed 1 container(s) left by an earlier run" in log
            assert "re-attaching" not in log
            assert not workspace.exists()
    finally:
        await tear_down((first, second), docker_client, "node-k", pool)


@pytest.mark.slow
async def test_killed_worker_reattaches_its_running_container(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """SIGKILL mid-task, restart within the lease: the new run re-attaches to the container
    and reports its result, once, under the first lease (not re-queued)."""
    pool = await start_pool(tmp_path / "pool.db", lease_timeout=60)
    home = tmp_path / "node-r"
    payload = bytes(range(256)) * 64
    first = await worker_subprocess(home, pool.address, env_overrides=DOCKER_ENV)
    second = None
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                task(
                    "import time\ntime.sleep(3)\n"
                    "open('results/out.bin', 'wb').write(bytes(range(256)) * 64)\n"
                    "print('wrote the result')\n"
                )
            )
            leftover = await running_container(docker_client, "node-r")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            assert docker_client.containers.get(leftover).status == "running"

            second = await worker_subprocess(home, pool.address, env_overrides=DOCKER_ENV)
            info = (await queue.wait_done([task_id], timeout=90))[task_id]
            assert info.status == pb.TASK_STATUS_SUCCEEDED, info.error
            assert info.attempt == 1  # re-attached under the first lease, not re-queued
            assert info.node_id == "node-r"
            assert b"wrote the result" in info.log_tail
            assert archive_files(await queue.download(task_id)) == {"results/out.bin": payload}
        await wait_for(
            lambda: container_gone(docker_client, leftover), 30, "re-attached container removed"
        )
        await wait_for(
            lambda: not list(home.rglob(f"{dockerx.SPECS_DIR}/*{dockerx.SPEC_SUFFIX}")),
            30,
            "spec gone",
        )
        log = (home / "stderr.log").read_text()
        assert "re-attaching to" in log
        assert "left by an earlier run" in log
        assert "removed 1 container(s)" not in log
        db = sqlite3.connect(f"file:{tmp_path / 'pool.db'}?mode=ro", uri=True)
        try:
            reports = db.execute(
                "SELECT status FROM reports WHERE task_id = ?", (task_id,)
            ).fetchall()
        finally:
            db.close()
        assert reports == [("succeeded",)]  # exactly once
    finally:
        await tear_down((first, second), docker_client, "node-r", pool)


@pytest.mark.slow
async def test_reattached_task_whose_lease_expired_is_stopped_and_run_again(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """Restarted after the lease expired: the re-attached container is stopped and its
    result dropped (the pool no longer honours the lease); the re-queued attempt runs."""
    pool = await start_pool(tmp_path / "pool.db", lease_timeout=3)
    home = tmp_path / "node-e"
    first = await worker_subprocess(home, pool.address, env_overrides=DOCKER_ENV)
    second = None
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(
                task(
                    "import os, time\n"
                    "open('results/out.txt', 'w').write(os.environ['HIVEMIND_TASK_ID'])\n"
                    "time.sleep(8)\n"
                )
            )
            leftover = await running_container(docker_client, "node-e")
            os.kill(first.pid, signal.SIGKILL)
            first.wait(10)
            for _ in range(300):
                info = await queue.get(task_id)
                if info.attempt == 2:  # the lease expired: re-queued
                    break
                await asyncio.sleep(0.1)
            else:
                raise AssertionError("the pool never re-queued the task")
            assert docker_client.containers.get(leftover).status == "running"

            second = await worker_subprocess(home, pool.address, env_overrides=DOCKER_ENV)
            info = (await queue.wait_done([task_id], timeout=90))[task_id]
            assert info.status == pb.TASK_STATUS_SUCCEEDED, info.error
            assert info.attempt == 2
            files = archive_files(await queue.download(task_id))
            assert files == {"results/out.txt": task_id.encode()}
        await wait_for(lambda: container_gone(docker_client, leftover), 30, "old container gone")
        log = (home / "stderr.log").read_text()
        assert "re-attaching to" in log
        db = sqlite3.connect(f"file:{tmp_path / 'pool.db'}?mode=ro", uri=True)
        try:
            reports = db.execute(
                "SELECT status FROM reports WHERE task_id = ?", (task_id,)
            ).fetchall()
        finally:
            db.close()
        assert reports == [("succeeded",)]  # the stopped run's report was not taken
    finally:
        await tear_down((first, second), docker_client, "node-e", pool)
