"""The choice of the executor this machine supports: Docker when usable, else the process sandbox.

Kept out of the package's __init__ so that importing one executor module never imports them all.
"""

from __future__ import annotations

import logging
import os
import sys
from typing import TYPE_CHECKING

from hivemind_worker.engine.executors.base import Executor

if TYPE_CHECKING:
    from hivemind_worker.config import Settings
    from hivemind_worker.engine.runners.environments import Environments

ENVIRONMENTS_DIR = "_environments"

log = logging.getLogger(__name__)


def select_executor(settings: Settings, node_id: str = "") -> Executor:
    """Docker when it is enabled and its engine answers; else the process sandbox, with why.

    Blocking (it pings the engine and removes containers an earlier run of this node left),
    so it is called before the engine's loop starts.
    """
    from hivemind_worker.engine.executors.process import ProcessExecutor

    if not settings.docker_enabled:
        log.info("Docker is disabled in the settings; tasks run in the process sandbox")
        return ProcessExecutor(settings.work_dir, environments=environments_for(settings))
    try:
        return _docker_executor(settings, node_id or settings.node_id)
    except Exception as exc:  # docker-py raises DockerException, requests and OS errors alike
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log.warning(
            "Docker is not usable (%s); tasks run in the process sandbox. "
            "Run `hivemind-worker doctor` for the fix.",
            reason,
        )
        fallback = ProcessExecutor(settings.work_dir, environments=environments_for(settings))
        fallback.notice = (
            f"Docker is not usable ({reason}), so tasks run in the weaker process sandbox. "
            "Start Docker (or install it), or run `hivemind-worker doctor` for the fix."
        )
        return fallback


def environments_for(settings: Settings) -> Environments:
    """Where the runner environments of this worker live: beside the task workspaces."""
    from hivemind_worker.engine.runners.environments import Environments

    return Environments(
        settings.work_dir / ENVIRONMENTS_DIR,
        find_links=[settings.runner_find_links] if settings.runner_find_links else [],
    )


DEFAULT_SOCKET = "/var/run/docker.sock"  # where docker-py looks without DOCKER_HOST


def missing_socket() -> str:
    """Why no Docker engine can answer here, when its Unix socket is plainly absent; "" when
    there is one (or an endpoint this cannot judge: TCP, a Windows pipe).

    Checked before the Docker SDK is imported: on the many machines without Docker, the
    SDK (with requests and urllib3, about 8 MiB resident) would load only to fail."""
    if sys.platform == "win32":
        return ""
    host = os.environ.get("DOCKER_HOST", "")
    if host and not host.startswith("unix://"):
        return ""
    path = host.removeprefix("unix://") or DEFAULT_SOCKET
    return "" if os.path.exists(path) else f"no Docker engine at {path}"


def _docker_executor(settings: Settings, node_id: str) -> Executor:
    if why := missing_socket():
        raise OSError(why)
    from hivemind_worker.engine.executors import docker as dockerx
    from hivemind_worker.engine.executors.images import parse_allowlist

    # A short deadline for the probe: a wedged engine must not hold up the worker's start.
    probe = dockerx.connect(timeout=5)
    try:
        probe.ping()
        info = probe.info()
    finally:
        probe.close()
    client = dockerx.connect()
    try:
        parent, why = dockerx.courtesy_cgroup_parent(
            str(info.get("CgroupDriver", "")), str(info.get("CgroupVersion", "1"))
        )
        log.info(
            "Docker %s: task containers %s",
            info.get("ServerVersion", "?"),
            f"under {why}" if parent else f"at the lowest CPU weight only ({why})",
        )
        executor = dockerx.DockerExecutor(
            client,
            settings.work_dir,
            node_id,
            python_image=settings.docker_python_image,
            pull_policy=settings.docker_pull_policy,
            allowlist=parse_allowlist(settings.docker_image_allowlist),
            network=settings.docker_network,
            cgroup_parent=parent,
            image_budget_bytes=settings.disk_cap_bytes(),
            environments=environments_for(settings),
            warm=settings.docker_warm_sandboxes,
        )
        removed = executor.remove_leftovers()
        if removed:
            log.info("removed %d container(s) left by an earlier run", removed)
    except BaseException:
        client.close()
        raise
    return executor


def ready_for_python(executor: Executor, settings: Settings) -> Executor:
    """`executor`, or the process sandbox when Docker cannot get its Python image.

    For the demo, whose tasks are all Python: on a machine with Docker but without the image
    and no way to pull it, the demo should still run, and say why it runs without Docker.
    Blocking (it may pull the image).
    """
    from hivemind_worker.engine.executors.base import ExecutorError
    from hivemind_worker.engine.executors.docker import DockerExecutor
    from hivemind_worker.engine.executors.process import ProcessExecutor

    if not isinstance(executor, DockerExecutor):
        return executor
    try:
        executor.images.ensure(settings.docker_python_image)
    except ExecutorError as exc:
        log.warning("%s; the demo runs its tasks in the process sandbox instead", exc)
        executor.client.close()
        return ProcessExecutor(settings.work_dir, environments=environments_for(settings))
    return executor
