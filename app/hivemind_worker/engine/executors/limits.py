"""Per-process resource limits for the process executor (POSIX rlimits; Windows: windows_job)."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

from hivemind_worker.engine.executors import launcher as _launcher


@dataclass(frozen=True)
class ProcessLimits:
    """Limits applied to a task's process just before it execs; None leaves one unset.

    rlimits are per process: a child the task spawns inherits them and gets its own
    budget. They are a backstop for a lower-trust sandbox, not a cgroup.
    """

    address_space_bytes: int | None = None
    cpu_seconds: int | None = None
    file_size_bytes: int | None = None
    # RLIMIT_NPROC, set inside the task's own user namespace, where since Linux 5.14 it counts
    # only the processes (and threads) of that namespace: a cap on the task's whole tree.
    max_processes: int | None = None
    core_bytes: int = 0
    nice: int = 10


def supported() -> bool:
    """Whether this platform can limit a task: POSIX rlimits, or a Job Object on Windows."""
    return os.name == "posix" or sys.platform == "win32"


def unsupported_reason() -> str:
    """Why limits cannot be enforced here; empty when they can."""
    if supported():
        return ""
    return (
        f"this worker cannot enforce task memory and CPU limits on {sys.platform} without "
        "Docker yet; install Docker to run tasks"
    )


# The launcher (Python source, see launcher.py) applies the limits and builds the walls.
ISOLATION_FAILED = _launcher.ISOLATION_FAILED
ISOLATION_MARKER = _launcher.ISOLATION_MARKER
LAUNCHER = _launcher.LAUNCHER


def launch_argv(
    python: str,
    limits: ProcessLimits,
    script: str,
    argv: tuple[str, ...],
    *,
    walls: str = "N",
    tmp_bytes: int = 64 * 1024 * 1024,
    binds: tuple[str, ...] = (),
    seccomp_filter: bytes = b"",
) -> list[str]:
    """The command that runs `script` under `limits` behind `walls` (see launcher.py)."""
    rlimits: list[tuple[str, int]] = []
    if limits.address_space_bytes is not None:
        rlimits.append(("RLIMIT_AS", max(limits.address_space_bytes, 0)))
    if limits.cpu_seconds is not None:
        rlimits.append(("RLIMIT_CPU", max(limits.cpu_seconds, 0)))
    if limits.file_size_bytes is not None:
        rlimits.append(("RLIMIT_FSIZE", max(limits.file_size_bytes, 0)))
    rlimits.append(("RLIMIT_CORE", limits.core_bytes))
    if limits.max_processes is not None:
        # Only ever passed where the kernel counts it per user namespace (sandbox_linux):
        # on older kernels it counts every process of the user, the worker's own included.
        rlimits.append(("RLIMIT_NPROC", max(limits.max_processes, 1)))
    packed = ",".join(f"{name}={value}" for name, value in rlimits)
    # -E -s: ignore PYTHON* variables and the user's site-packages; with -c the workspace
    # (the current directory) stays first on sys.path, so a task can import its own modules.
    return [
        python, "-E", "-s", "-c", LAUNCHER, packed, str(limits.nice), str(os.getpid()),
        walls, str(max(int(tmp_bytes), 1024 * 1024)), "\n".join(binds), seccomp_filter.hex(),
        script, *argv,
    ]  # fmt: skip
