"""Per-process resource limits for the process executor (POSIX rlimits; none yet on Windows)."""

from __future__ import annotations

import os
import sys
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


# Runs as `python -E -s -c LAUNCHER CONFIG main.py ARGS...` in the task's workspace: it applies
# the limits to itself and then runs main.py in the same interpreter. Limits are applied here,
# after exec, rather than in a preexec_fn between fork and exec: the worker has gRPC threads,
# and Python code in a forked child of a threaded process can deadlock or crash (it did:
# at-fork handlers segfaulted under load).
LAUNCHER = """\
import json, os, resource, runpy, sys
cfg = json.loads(sys.argv[1])
for name, value in cfg["rlimits"]:
    which = getattr(resource, name)
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))
if cfg["nice"]:
    os.nice(cfg["nice"])
if sys.platform.startswith("linux"):
    import ctypes, signal
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG: die with the worker
    if os.getppid() != cfg["parent"]:
        os._exit(137)
sys.argv = sys.argv[2:]
del json, resource, cfg
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def launch_argv(
    python: str, limits: ProcessLimits, script: str, argv: tuple[str, ...]
) -> list[str]:
    """The command that runs `script` under `limits` (see LAUNCHER)."""
    import json

    rlimits: list[tuple[str, int]] = []
    if limits.address_space_bytes is not None:
        rlimits.append(("RLIMIT_AS", max(limits.address_space_bytes, 0)))
    if limits.cpu_seconds is not None:
        rlimits.append(("RLIMIT_CPU", max(limits.cpu_seconds, 0)))
    if limits.file_size_bytes is not None:
        rlimits.append(("RLIMIT_FSIZE", max(limits.file_size_bytes, 0)))
    rlimits.append(("RLIMIT_CORE", limits.core_bytes))
    # RLIMIT_NPROC is deliberately not used: it counts every process of the user, so when the
    # worker and its tasks share a uid it would count (and starve) the worker's own threads
    # and processes, and it does nothing at all for root.
    config = json.dumps({"rlimits": rlimits, "nice": limits.nice, "parent": os.getpid()})
    # -E -s: ignore PYTHON* variables and the user's site-packages; with -c the workspace
    # (the current directory) stays first on sys.path, so a task can import its own modules.
    return [python, "-E", "-s", "-c", LAUNCHER, config, script, *argv]
