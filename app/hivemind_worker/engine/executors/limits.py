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
# Arguments: pairs of (rlimit name, value) as one comma-separated list, nice, parent pid,
# then the script and its argv. Plain text rather than JSON: importing json (and runpy) would
# add ~15 ms to every task's start.
ISOLATION_FAILED = 125
ISOLATION_MARKER = b"hivemind: cannot isolate the task"

LAUNCHER = """\
import os, resource, sys
for item in sys.argv[1].split(","):
    name, value = item.split("=")
    which, value = getattr(resource, name), int(value)
    hard = resource.getrlimit(which)[1]
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    resource.setrlimit(which, (value, value))
if int(sys.argv[2]):
    os.nice(int(sys.argv[2]))
if sys.platform.startswith("linux"):
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(1, 9)  # PR_SET_PDEATHSIG, SIGKILL: die with the worker
    if os.getppid() != int(sys.argv[3]):
        os._exit(137)
    # New user, network and PID namespaces: no network at all (an empty namespace, not even
    # the host's loopback), and the task's program becomes PID 1 of its own namespace, so
    # when it ends the kernel ends every process it left behind, daemonised or not.
    uid, gid = os.getuid(), os.getgid()
    if libc.unshare(0x10000000 | 0x40000000 | 0x20000000) != 0:
        err = os.strerror(ctypes.get_errno())
        sys.stderr.write(f"hivemind: cannot isolate the task (unshare: {err})\\n")
        os._exit(125)
    for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"),
                       ("gid_map", f"{gid} {gid} 1")):
        with open(f"/proc/self/{name}", "w") as _f:
            _f.write(text)
    # The launcher waits outside; inside, a small init (PID 1) waits for the task and then
    # exits, which ends the namespace. The task itself is not PID 1, so it keeps ordinary
    # signal semantics (a task may kill itself). The verdict comes back through a pipe.
    r, w = os.pipe()
    child = os.fork()
    if child:
        os.close(w)
        while True:
            try:
                os.waitpid(child, 0)
                break
            except InterruptedError:
                continue
            except ChildProcessError:
                break
        verdict = os.read(r, 16).decode() or "E125"
        if verdict[0] == "S":
            import signal
            try:
                signal.signal(int(verdict[1:]), signal.SIG_DFL)
            except (OSError, ValueError):  # SIGKILL and SIGSTOP keep their default anyway
                pass
            os.kill(os.getpid(), int(verdict[1:]))  # die the same death as the task
        os._exit(int(verdict[1:]) if verdict[0] == "E" else 128 + int(verdict[1:]))
    os.close(r)
    libc.prctl(1, 9)
    task = os.fork()
    if task:
        while True:
            try:
                _, status = os.waitpid(task, 0)
                break
            except InterruptedError:
                continue
        if os.WIFSIGNALED(status):
            os.write(w, b"S%d" % os.WTERMSIG(status))
        else:
            os.write(w, b"E%d" % os.WEXITSTATUS(status))
        os._exit(0)
    os.close(w)
    libc.prctl(1, 9)  # the task dies with its init too
    del libc, ctypes, uid, gid, child, task, r, w, text, _f
sys.argv = sys.argv[4:]
with open(sys.argv[0], "rb") as _f:
    _code = compile(_f.read(), sys.argv[0], "exec")
del os, resource, sys, item, name, value, which, hard
__file__ = "main.py"
exec(_code)
"""


def launch_argv(
    python: str, limits: ProcessLimits, script: str, argv: tuple[str, ...]
) -> list[str]:
    """The command that runs `script` under `limits` (see LAUNCHER)."""
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
    packed = ",".join(f"{name}={value}" for name, value in rlimits)
    # -E -s: ignore PYTHON* variables and the user's site-packages; with -c the workspace
    # (the current directory) stays first on sys.path, so a task can import its own modules.
    return [
        python, "-E", "-s", "-c", LAUNCHER, packed, str(limits.nice), str(os.getpid()),
        script, *argv,
    ]  # fmt: skip
