"""The ml task kind under Docker: the runner's environment built with uv on this machine, copied
into a derived image (no network in the build), and the training run in a locked-down container."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from helpers.harness import archive_files, queue_client, start_pool, start_worker
from helpers.images import STDLIB_IMAGE, TEST_IMAGE, remove_runner_images
from helpers.runners import ml_task
from hivemind_worker.config import Settings
from hivemind_worker.engine.events import TaskProgress
from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.engine.executors.runner_images import LABEL_RUNNER
from hivemind_worker.engine.runners.environments import Environments
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = [
    pytest.mark.docker,
    pytest.mark.slow,
    pytest.mark.usefixtures("memory_keyring"),
    pytest.mark.timeout(900),
]


@pytest.fixture
def stdlib_image(docker_client: docker.DockerClient) -> Iterator[str]:
    try:
        docker_client.images.get(STDLIB_IMAGE)
    except docker.errors.ImageNotFound:
        missing = (
            f"the image {STDLIB_IMAGE} is missing; build it with `python3 build.py test-image`"
        )
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            pytest.fail(missing, pytrace=False)
        pytest.skip(missing)
    # Each test here checks the build, so none may find its image made by an earlier run that
    # stopped midway; and the images it built (hundreds of MB) go after.
    remove_runner_images(docker_client)
    yield STDLIB_IMAGE
    remove_runner_images(docker_client)


def docker_runners(
    client: docker.DockerClient, image: str, environments: Path
) -> Callable[[Settings], dockerx.DockerExecutor]:
    def make(settings: Settings) -> dockerx.DockerExecutor:
        return dockerx.DockerExecutor(
            client, settings.work_dir, settings.node_id, python_image=image,
            pull_policy="never", environments=Environments(environments),
        )  # fmt: skip

    return make


async def run_one(
    tmp_path: Path, executor: Callable[[Settings], dockerx.DockerExecutor], spec: pb.TaskSpec
) -> tuple[pb.TaskInfo, dict[str, bytes], list[object]]:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node", pool.address, executor=executor)
    try:
        async with queue_client(pool.address) as queue:
            task_id = await queue.submit(spec)
            info = (await queue.wait_done([task_id], timeout=840))[task_id]
            files = archive_files(await queue.download(task_id)) if info.result_size else {}
    finally:
        await worker.stop()
        await pool.stop()
    return info, files, worker.events


async def test_random_forest_on_iris_in_a_container(
    tmp_path: Path, docker_client: docker.DockerClient, stdlib_image: str
) -> None:
    spec = ml_task(framework="scikit-learn", model="random-forest-classifier", dataset="iris",
                   validation_split=0.3, seed=7, hyperparameters={"n_estimators": 50})  # fmt: skip
    info, files, events = await run_one(
        tmp_path, docker_runners(docker_client, stdlib_image, tmp_path / "envs"), spec
    )
    assert info.status == pb.TASK_STATUS_SUCCEEDED, (info.error, info.log_tail[-2000:])
    metrics = json.loads(files["results/metrics.json"])
    assert metrics["metrics"]["accuracy"] >= 0.9 and metrics["rows"] == 150
    shown = [e.text for e in events if isinstance(e, TaskProgress) and e.unit == "environment"]
    assert any("building the scikit-learn environment" in t for t in shown), shown
    assert any(f"into an image on {stdlib_image}" in t for t in shown), shown
    steps = [e.step for e in events if isinstance(e, TaskProgress) and e.unit == "step"]
    assert steps == list(range(1, 11))
    # The environment went into an image of its own, labelled for pruning and clean-up.
    (runner_image,) = [
        i for i in docker_client.images.list(filters={"label": LABEL_RUNNER})
        if any(t.startswith("hivemind-runner-scikit-learn:") for t in i.tags)
    ]  # fmt: skip
    assert runner_image.labels[LABEL_RUNNER] == "scikit-learn"


async def test_an_image_without_the_standard_library_fails_with_what_to_do(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """python3-minimal has no json or ctypes: the task fails saying which setting to change,
    before anything is downloaded."""
    spec = ml_task(framework="scikit-learn", model="k-means", dataset="iris")
    info, _, _ = await run_one(
        tmp_path, docker_runners(docker_client, TEST_IMAGE, tmp_path / "envs"), spec
    )
    assert info.status == pb.TASK_STATUS_FAILED
    assert "lacks the standard library the ml and data runners need" in info.error
    assert "docker_python_image" in info.error
    assert not (tmp_path / "envs").exists() or not any((tmp_path / "envs").iterdir())
