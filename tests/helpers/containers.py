"""Clean-up of the containers a Docker test leaves, which the worker may be removing itself."""

from __future__ import annotations

import time

import docker
import docker.errors

GONE_WITHIN = 60.0  # seconds for a removal under way elsewhere to finish (a loaded machine)


def remove_container(client: docker.DockerClient, container_id: str) -> None:
    """Remove a container by force and return once it is gone.

    The worker removes its own containers, and a test's clean-up often runs while it does (the
    worker just killed mid-removal, the daemon carrying on): Docker then answers 409 "removal
    ... is already in progress", which means the container is going; wait (bounded) for that
    instead of failing the test in its clean-up. Any other refusal is raised.
    """
    try:
        client.api.remove_container(container_id, force=True, v=True)
        return
    except docker.errors.NotFound:
        return
    except docker.errors.APIError as exc:
        if exc.status_code != 409 or "already in progress" not in str(exc):
            raise
    deadline = time.monotonic() + GONE_WITHIN
    while time.monotonic() < deadline:
        try:
            client.api.inspect_container(container_id)
        except docker.errors.NotFound:
            return
        time.sleep(0.2)
    raise AssertionError(f"container {container_id[:12]} still being removed after {GONE_WITHIN} s")
