"""Per-process resource limits for the process executor (POSIX rlimits; none yet on Windows)."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class ProcessLimits:
    """Limits applied to a task's process just before it execs; None leaves one unset.

    rlimits are per process: a child the task spawns inherits them and gets its own
    budget. They are a backstop for a lower-trust sandbox, not a cgroup.
    """

    address_space_bytes: int | None = None
    cpu_seconds: int | None = None
    file_size_bytes: int | None = None
    core_bytes: int = 0
    nice: int = 10


def supported() -> bool:
    """Whether this platform can enforce ProcessLimits (POSIX rlimits)."""
    return os.name == "posix" and sys.platform != "win32"


def unsupported_reason() -> str:
    """Why limits cannot be enforced here; empty when they can."""
    if supported():
        return ""
    return (
        f"this worker cannot enforce task memory and CPU limits on {sys.platform} without "
        "Docker yet; install Docker to run tasks"
    )


def posix_preexec(limits: ProcessLimits) -> Callable[[], None]:
    """A preexec_fn for subprocess that applies `limits` in the child before exec.

    Everything that could take a lock (the import, reading the current hard limits) is done
    here, in the parent: the returned function runs between fork and exec, where another
    thread of the worker (grpc, asyncio.to_thread) may have held a lock at fork time.
    """
    import resource

    settings: list[tuple[int, int, int]] = []

    def add(which: int, value: int) -> None:
        # Never ask for more than the worker's own hard limit: raising it needs privileges
        # and would make setrlimit fail in the child.
        _, hard = resource.getrlimit(which)
        value = max(value, 0)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        settings.append((which, value, value))

    if limits.address_space_bytes is not None:
        add(resource.RLIMIT_AS, limits.address_space_bytes)
    if limits.cpu_seconds is not None:
        add(resource.RLIMIT_CPU, limits.cpu_seconds)
    if limits.file_size_bytes is not None:
        add(resource.RLIMIT_FSIZE, limits.file_size_bytes)
    add(resource.RLIMIT_CORE, limits.core_bytes)
    # RLIMIT_NPROC is deliberately not used: it counts every process of the user, so when the
    # worker and its tasks share a uid it would count (and starve) the worker's own threads
    # and processes, and it does nothing at all for root.
    nice = limits.nice
    setrlimit = resource.setrlimit
    set_nice = os.nice

    def apply() -> None:
        for which, soft, hard in settings:
            setrlimit(which, (soft, hard))
        if nice:
            set_nice(nice)

    return apply
