"""Fixtures for tests against a real Docker engine; under CI=true a missing engine fails loudly."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import docker
import docker.errors
import pytest

from helpers.containers import remove_container
from helpers.images import TEST_IMAGE
from hivemind_worker.engine.executors import docker as dockerx

HOW_TO = (
    "start dockerd and build the test image with `python3 build.py test-image` "
    "(needs debootstrap and root)"
)


def _unavailable(reason: str) -> None:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"Docker tests cannot run under CI: {reason}; {HOW_TO}", pytrace=False)
    pytest.skip(f"{reason}; {HOW_TO}")


@pytest.fixture(scope="session")
def docker_client() -> Iterator[docker.DockerClient]:
    try:
        client = dockerx.connect()
        client.ping()
    except Exception as exc:  # any failure to reach the engine
        _unavailable(f"the Docker engine is not reachable ({exc})")
    try:
        client.images.get(TEST_IMAGE)
    except docker.errors.ImageNotFound:
        _unavailable(f"the image {TEST_IMAGE} is missing")
    yield client
    client.close()


@pytest.fixture
def node_id(request: pytest.FixtureRequest) -> str:
    """A node id of this test alone, so leftover sweeps never touch another test's containers."""
    return f"test-{os.getpid()}-{abs(hash(request.node.nodeid)) % 10**8}"


@pytest.fixture
def make_executor(
    docker_client: docker.DockerClient, tmp_path: Path, node_id: str
) -> Iterator[Callable[..., dockerx.DockerExecutor]]:
    """DockerExecutor(**options) with the test image as Python image; containers removed after."""
    made: list[dockerx.DockerExecutor] = []

    def factory(**options: object) -> dockerx.DockerExecutor:
        options.setdefault("python_image", TEST_IMAGE)
        options.setdefault("pull_policy", "never")
        executor = dockerx.DockerExecutor(
            docker_client,
            Path(str(options.pop("work_dir", tmp_path / "work"))),
            str(options.pop("node_id", node_id)),
            **options,  # type: ignore[arg-type]
        )
        made.append(executor)
        return executor

    yield factory
    for container in docker_client.containers.list(
        all=True, filters={"label": f"{dockerx.LABEL_NODE}={node_id}"}, ignore_removed=True
    ):
        remove_container(docker_client, container.id)  # the executor may be removing it
