"""The machine's Docker: a client for its engine, the user task containers run as, and the
parent cgroup that puts the person's own programs ahead of every task container."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import docker

from hivemind_worker.engine.executors.base import ExecutorError

API_TIMEOUT = 60
# The unprivileged user tasks run as when the worker itself runs as root.
NOBODY = "65534:65534"


def connect(timeout: int = API_TIMEOUT) -> docker.DockerClient:
    """A client for the local engine (DOCKER_HOST, the socket, or Docker Desktop's pipe).

    The pool is sized for three long-lived streams per running container (wait, logs,
    stats) so requests never queue behind them.
    """
    return docker.from_env(version="auto", timeout=timeout, max_pool_size=64)


def worker_user() -> str:
    """uid:gid for task containers: the worker's own, or nobody's when it runs as root."""
    getuid = getattr(os, "getuid", None)
    getgid = getattr(os, "getgid", None)
    if getuid is None or getgid is None or getuid() == 0:
        return NOBODY
    return f"{getuid()}:{getgid()}"


def hand_over(workspace: Path, user: str) -> None:
    """The worker is root and the task is not: hand it the workspace it must write."""
    if user != NOBODY or not hasattr(os, "lchown"):
        return
    try:
        chown_tree(workspace, 65534, 65534)
    except OSError as exc:
        raise ExecutorError(f"cannot hand the workspace to the task user: {exc}") from exc


def chown_tree(root: Path, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), uid, gid)


def courtesy_cgroup_parent(cgroup_driver: str, cgroup_version: str) -> tuple[str, str]:
    """A parent cgroup of minimal CPU weight for task containers, made when this process can.

    Returns (cgroup_parent, reason); an empty parent means containers sit under Docker's
    default parent with only their own low cpu_shares (and `reason` says why).
    With the cgroupfs driver and cgroup v1 the worker (as root) makes /hivemind under the
    cpu controller with cpu.shares=2; with cgroup v2 it makes /hivemind with cpu.weight=1.
    With the systemd driver the parent is hivemind.slice when the person has made it (systemd
    owns its weight; see docs/docker.md).
    """
    if not sys.platform.startswith("linux"):
        return "", "not Linux: Docker Desktop's VM has its own scheduler (see the docs)"
    if cgroup_driver == "systemd":
        # systemd owns the weights; the person makes the slice once (see docs/docker.md).
        for slice_dir in (
            Path("/sys/fs/cgroup/hivemind.slice"),
            Path("/sys/fs/cgroup/cpu/hivemind.slice"),
        ):
            if slice_dir.is_dir():
                return "hivemind.slice", f"hivemind.slice ({slice_dir})"
        return "", "systemd cgroup driver: create hivemind.slice with CPUWeight=1 (docs/docker.md)"
    if cgroup_driver != "cgroupfs":
        return "", f"cgroup driver {cgroup_driver or 'unknown'}"
    if str(cgroup_version) == "2":
        base = Path("/sys/fs/cgroup/hivemind")
        setting, value = "cpu.weight", "1"
    else:
        base = Path("/sys/fs/cgroup/cpu/hivemind")
        setting, value = "cpu.shares", "2"
    try:
        base.mkdir(exist_ok=True)
        (base / setting).write_text(value)
    except OSError as exc:
        return "", f"cannot make {base}: {exc.strerror or exc}"
    return "/hivemind", f"{base} with {setting}={value}"
