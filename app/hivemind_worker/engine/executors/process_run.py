"""The process sandbox's record of one running task, and the helpers around it: its minimal
environment, usage sampling of its whole process tree, and how its exit is worded.

Split from process.py (which runs and supervises the task) to keep each room to one concern.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from hivemind_worker.engine.executors import limits as plimits
from hivemind_worker.engine.executors import sandbox_linux, windows_job
from hivemind_worker.engine.executors.base import ExecutorError, PausableRun, Usage
from hivemind_worker.engine.executors.freeze import TreeControl
from hivemind_worker.engine.executors.workspace import TMP_DIR, disk_usage
from hivemind_worker.tasks import TaskSpec

log = logging.getLogger("hivemind_worker.engine.executors.process")

SAMPLE_INTERVAL = 1.0


@dataclass(eq=False)
class Running(PausableRun):
    task: TaskSpec
    proc: asyncio.subprocess.Process
    started: float  # time.monotonic()
    leader: psutil.Process | None = None
    paused_at: float | None = None
    paused_total: float = 0.0
    cancelled: bool = False
    timed_out: bool = False
    # Every process seen in the task's tree, so that one which left the process group
    # (setsid) is still paused, resumed and killed with it. Touched from sampling threads.
    known: set[psutil.Process] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    usage: Usage = field(default_factory=Usage)
    cpu_seconds: float = 0.0
    max_rss: int = 0
    last_sample: float = 0.0  # when the supervisor last asked for a sample
    sampled_at: float = 0.0  # when the last sample was taken, for cpu_percent
    tail: bytearray = field(default_factory=bytearray)
    output_bytes: int = 0
    workspace: Path | None = None
    disk_limit: int = 0  # bytes; 0: not watched
    disk_exceeded: bool = False
    disk_checked_at: float = 0.0  # time.monotonic() of the last walk of the workspace
    disk_walk_seconds: float = 0.0  # how long that walk took
    job: windows_job.Job | None = None  # Windows: the Job Object holding the task's tree
    control: TreeControl | None = None  # freeze and CPU share of the whole tree


def default_python() -> str:
    if getattr(sys, "frozen", False):
        # A frozen worker's sys.executable is the worker itself, not an interpreter.
        found = shutil.which("python3") or shutil.which("python")
        if not found:
            raise ExecutorError(
                "no Python interpreter was found (python3 on PATH) to run python tasks "
                "without Docker"
            )
        return found
    if not sys.executable:
        raise ExecutorError("no Python interpreter was found to run python tasks")
    return sys.executable


def task_environment(
    task: TaskSpec, workspace: Path, results_dir: Path, *, confined: bool
) -> dict[str, str]:
    """A minimal environment: nothing is inherited from the worker, which may hold secrets."""
    env = {
        "PATH": os.defpath,
        "HOME": "/tmp" if confined else str(workspace),
        "TMPDIR": "/tmp" if confined else str(workspace / TMP_DIR),
        "LANG": "C.UTF-8",
        # `-E` makes the task's own interpreter ignore PYTHON* variables; this one reaches
        # the Python processes the task starts without -I/-E.
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    if sys.platform == "win32":
        # Python needs SYSTEMROOT on Windows (sockets, random); temporary files go to the
        # workspace, the one folder a Low-integrity task may write.
        root = os.environ.get("SYSTEMROOT", r"C:\Windows")
        env.update(SYSTEMROOT=root, PATH=rf"{root}\System32;{root}",
                   TEMP=env["TMPDIR"], TMP=env["TMPDIR"], USERPROFILE=str(workspace))  # fmt: skip
    for name, value in task.env.items():
        if name == "PATH" or name.startswith("HIVEMIND_"):
            continue  # the worker's values win
        env[name] = value
    env["HIVEMIND_TASK_ID"] = task.task_id
    env["HIVEMIND_RESULTS_DIR"] = str(results_dir.absolute())
    return env


def psutil_process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def sample(run: Running) -> None:
    """One usage sample of the task's process tree (runs in a thread; reads /proc)."""
    tree: list[psutil.Process] = []
    leader = run.leader
    if leader is not None:
        with contextlib.suppress(psutil.Error):
            tree.append(leader)
            tree.extend(leader.children(recursive=True))
    with run.lock:
        run.known.update(tree)
        candidates = list(run.known)
    rss = 0
    cpu = 0.0
    gone: list[psutil.Process] = []
    for p in candidates:
        try:
            with p.oneshot():
                if p.status() == psutil.STATUS_ZOMBIE:
                    gone.append(p)
                    continue
                rss += p.memory_info().rss
                t = p.cpu_times()
                # children_* hold the children this process has reaped; live children are
                # counted on their own, so nothing is counted twice.
                cpu += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            gone.append(p)
    if gone:
        with run.lock:
            run.known.difference_update(gone)
    now = time.monotonic()
    previous_cpu = run.cpu_seconds
    previous_at = run.sampled_at
    run.cpu_seconds = max(run.cpu_seconds, cpu)
    run.max_rss = max(run.max_rss, rss)
    elapsed = now - previous_at
    percent = (run.cpu_seconds - previous_cpu) / elapsed * 100 if previous_at and elapsed else 0.0
    run.usage = Usage(cpu_percent=percent, memory_bytes=rss, cpu_seconds=run.cpu_seconds)
    run.sampled_at = now
    # The walk's cost grows with the number of files; it is spaced out so that it takes at
    # most a tenth of the time (a workspace of 100,000 files is then walked every few seconds).
    due = run.disk_checked_at + max(SAMPLE_INTERVAL, 10 * run.disk_walk_seconds)
    if run.disk_limit > 0 and run.workspace is not None and not run.disk_exceeded and now >= due:
        run.disk_exceeded = disk_usage(run.workspace, run.disk_limit) > run.disk_limit
        run.disk_checked_at = time.monotonic()
        run.disk_walk_seconds = run.disk_checked_at - now


def exit_error(rc: int, tail: bytes | bytearray) -> str:
    """The error of a non-zero exit: `rc` as asyncio reports it (-N for signal N)."""
    if rc < 0:
        return f"killed by signal {signal_name(-rc)}"
    if rc == plimits.ISOLATION_FAILED and plimits.ISOLATION_MARKER in tail:
        marker = tail.rfind(plimits.ISOLATION_MARKER)
        reason = bytes(tail[marker:]).split(b"\n", 1)[0].decode(errors="replace")
        log.error("a task could not be isolated: %s", reason)
        return sandbox_linux.isolation_problem(reason.split("(", 1)[-1].rstrip(")"))
    return f"exited with code {rc}"


def signal_name(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        return str(number)
    hint = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(name, "")
    return name + hint
