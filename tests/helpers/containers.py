"""Clean-up of the containers a Docker test leaves, which the worker may be removing itself."""

from __future__ import annotations

import contextlib
import time

import docker
import docker.errors

from hivemind_worker.engine.executors.images import force_remove

GONE_WITHIN = 60.0  # seconds for a removal under way elsewhere to finish (a loaded machine)


def remove_container(client: docker.DockerClient, container_id: str) -> None:
    """Remove a container by force and return once it is gone.

    The worker removes its own containers, and a test's clean-up often runs while it does (the
    worker just killed mid-removal, the daemon carrying on): Docker then answers 409 "removal
    ... is already in progress", which the product counts as removed (force_remove); here the
    clean-up also waits (bounded) for the container to be gone, so the next test starts clean.
    """
    with contextlib.suppress(docker.errors.NotFound):
        force_remove(client.containers.get(container_id))
    deadline = time.monotonic() + GONE_WITHIN
    while time.monotonic() < deadline:
        try:
            client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return
        time.sleep(0.2)
    raise AssertionError(f"container {container_id[:12]} still being removed after {GONE_WITHIN} s")
