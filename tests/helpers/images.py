"""The Docker tests' image: a debootstrap rootfs imported with `python3 build.py test-image`."""

from __future__ import annotations

import contextlib

import docker
import docker.errors

from helpers.containers import remove_container
from hivemind_worker.engine.executors.runner_images import LABEL_RUNNER

TEST_IMAGE = "hivemind-test-python:bookworm"
# TEST_IMAGE with the whole standard library, which the ml and data runners need (build.py).
STDLIB_IMAGE = "hivemind-test-python-stdlib:bookworm"


def remove_runner_images(client: docker.DockerClient) -> None:
    """Remove the runner images the tests built (`hivemind-runner-*`) and any container still
    using one. A test stopped midway leaves both (a demo killed at its timeout leaves its task
    running, and Docker will not remove an image a running container uses, even forced), and
    a test that checks the build would then find the image made and build nothing."""
    for image in client.images.list(filters={"label": LABEL_RUNNER}):
        if not any(tag.startswith("hivemind-runner-") for tag in image.tags):
            continue
        for container in client.containers.list(
            all=True, filters={"ancestor": image.id}, ignore_removed=True
        ):
            remove_container(client, container.id)
        with contextlib.suppress(docker.errors.ImageNotFound):
            client.images.remove(image.id, force=True)
