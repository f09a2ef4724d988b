"""Limits for a process-sandbox task's whole tree: a cgroup of its own (Linux).

Three ways, the first that works on this machine (probed once, by making a real cgroup):
- root, cgroup v2: `/sys/fs/cgroup/hivemind-worker/<task>` with pids.max, memory.max,
  memory.swap.max = 0, cpu.max (the task's cpus) and cpu.weight = 1 (the person's programs
  first);
- root, cgroup v1: the same under each of the pids, memory and cpu hierarchies (pids.max,
  memory.limit_in_bytes, cpu.cfs_quota_us, cpu.shares = 2);
- an ordinary user with a systemd user session: `systemd-run --user --scope` with TasksMax,
  MemoryMax, MemorySwapMax = 0, CPUQuota and CPUWeight = 1 (systemd makes the cgroup);
and none otherwise (the sandbox then relies on the per-namespace process cap and rlimits,
and says so). A task started into a cgroup the worker writes itself waits for one byte on
stdin (launcher wall "G") until its pid is in the cgroup, so nothing it forks escapes it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shutil
import signal
import subprocess
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

ROOT = Path("/sys/fs/cgroup")
GROUP = "hivemind-worker"
CPU_PERIOD_US = 100_000
SYSTEMD_RUN_TIMEOUT = 10.0


@dataclass(frozen=True)
class TaskLimits:
    """What one task's tree may use together."""

    max_processes: int
    memory_bytes: int
    cpus: float


@dataclass
class TaskCgroup:
    """The cgroup folders of one task (one per v1 hierarchy, or one for v2)."""

    folders: list[Path] = field(default_factory=list)
    version: int = 2

    def add(self, pid: int) -> None:
        for folder in self.folders:
            (folder / "cgroup.procs").write_text(str(pid))

    def oom_killed(self) -> bool:
        """Whether the kernel's OOM killer ended a process of this cgroup."""
        for folder in self.folders:
            for name in ("memory.events", "memory.oom_control"):
                with contextlib.suppress(OSError):
                    for line in (folder / name).read_text().splitlines():
                        key, _, value = line.partition(" ")
                        if key == "oom_kill" and int(value or 0) > 0:
                            return True
        return False

    def remove(self) -> None:
        """Remove the folders, killing what is left in them (normally nothing: the end of the
        task's PID namespace ended every process); retried while the last ones exit."""
        for folder in self.folders:
            for _ in range(100):
                with contextlib.suppress(OSError, ValueError):
                    for pid in (folder / "cgroup.procs").read_text().split():
                        with contextlib.suppress(OSError):
                            os.kill(int(pid), signal.SIGKILL)
                try:
                    folder.rmdir()
                    break
                except FileNotFoundError:
                    break
                except OSError:
                    time.sleep(0.02)
            else:
                log.warning("cannot remove the task cgroup %s", folder)


@dataclass(frozen=True)
class Cgroups:
    """How this machine limits a task's tree: kind is "v2", "v1", "systemd-user" or ""."""

    kind: str
    reason: str  # what it means, or why there is none

    def make(self, task_id: str, limits: TaskLimits) -> TaskCgroup | None:
        """A cgroup for one task with `limits` (v1 and v2); None for the other kinds."""
        if self.kind == "v2":
            return _make_v2(f"{task_id}-{uuid.uuid4().hex[:6]}", limits)
        if self.kind == "v1":
            return _make_v1(f"{task_id}-{uuid.uuid4().hex[:6]}", limits)
        return None

    def wrap(self, argv: list[str], limits: TaskLimits) -> list[str]:
        """`argv` run in a systemd scope with `limits` (systemd-user only)."""
        if self.kind != "systemd-user":
            return argv
        return [*systemd_run_prefix(limits), *argv]


def systemd_run_prefix(limits: TaskLimits) -> list[str]:
    """systemd-run arguments putting a command in a transient user scope with `limits`."""
    quota = max(math.ceil(limits.cpus * 100), 1)
    return [
        shutil.which("systemd-run") or "systemd-run",
        "--user", "--scope", "--quiet", "--collect",
        "-p", f"TasksMax={limits.max_processes}",
        "-p", f"MemoryMax={limits.memory_bytes}",
        "-p", "MemorySwapMax=0",
        "-p", f"CPUQuota={quota}%",
        "-p", "CPUWeight=1",
        "--",
    ]  # fmt: skip


def _write(folder: Path, name: str, value: str) -> None:
    (folder / name).write_text(value)


def _make_v2(name: str, limits: TaskLimits) -> TaskCgroup:
    parent = ROOT / GROUP
    folder = parent / name
    folder.mkdir()
    group = TaskCgroup([folder], 2)
    try:
        _write(folder, "pids.max", str(limits.max_processes))
        _write(folder, "memory.max", str(limits.memory_bytes))
        with contextlib.suppress(FileNotFoundError):  # no swap accounting on this kernel
            _write(folder, "memory.swap.max", "0")
        quota = max(int(limits.cpus * CPU_PERIOD_US), 1000)
        _write(folder, "cpu.max", f"{quota} {CPU_PERIOD_US}")
        _write(folder, "cpu.weight", "1")
    except BaseException:
        group.remove()
        raise
    return group


_V1 = ("pids", "memory", "cpu")


def _make_v1(name: str, limits: TaskLimits) -> TaskCgroup:
    group = TaskCgroup([], 1)
    try:
        for controller in _V1:
            folder = ROOT / controller / GROUP / name
            folder.mkdir()
            group.folders.append(folder)
            if controller == "pids":
                _write(folder, "pids.max", str(limits.max_processes))
            elif controller == "memory":
                _write(folder, "memory.limit_in_bytes", str(limits.memory_bytes))
                with contextlib.suppress(OSError):  # memsw exists only with swap accounting
                    _write(folder, "memory.memsw.limit_in_bytes", str(limits.memory_bytes))
            else:
                _write(folder, "cpu.cfs_period_us", str(CPU_PERIOD_US))
                quota = max(int(limits.cpus * CPU_PERIOD_US), 1000)
                _write(folder, "cpu.cfs_quota_us", str(quota))
                _write(folder, "cpu.shares", "2")
    except BaseException:
        group.remove()
        raise
    return group


def _prepare_v2() -> None:
    parent = ROOT / GROUP
    parent.mkdir(exist_ok=True)
    wanted = {"cpu", "memory", "pids"}
    available = set((ROOT / "cgroup.controllers").read_text().split())
    missing = wanted - available
    if missing:
        raise OSError(f"cgroup v2 lacks the {', '.join(sorted(missing))} controller(s)")
    enabled = set((ROOT / "cgroup.subtree_control").read_text().split())
    if wanted - enabled:
        _write(ROOT, "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(wanted - enabled)))
    _write(parent, "cgroup.subtree_control", " ".join(f"+{c}" for c in sorted(wanted)))
    # The weight is relative among siblings: the parent of all tasks gets the lowest, so the
    # tasks together yield to the person's programs (the tasks' own weights only rank them).
    _write(parent, "cpu.weight", "1")


def _prepare_v1() -> None:
    for controller in _V1:
        if not (ROOT / controller / "cgroup.procs").exists():
            raise OSError(f"no cgroup v1 {controller} hierarchy at {ROOT / controller}")
        (ROOT / controller / GROUP).mkdir(exist_ok=True)
    # As for v2: the lowest weight on the parent of all tasks, which competes with the rest.
    _write(ROOT / "cpu" / GROUP, "cpu.shares", "2")


def _systemd_user_works() -> str:
    """'' when `systemd-run --user --scope` runs here, else why not."""
    if shutil.which("systemd-run") is None:
        return "no systemd-run"
    runtime = os.environ.get("XDG_RUNTIME_DIR", "")
    if not runtime or not Path(runtime, "systemd").exists():
        return "no systemd user session"
    probe = TaskLimits(max_processes=16, memory_bytes=64 << 20, cpus=1.0)
    try:
        proc = subprocess.run(
            [*systemd_run_prefix(probe), "true"],
            capture_output=True,
            timeout=SYSTEMD_RUN_TIMEOUT,
            stdin=subprocess.DEVNULL,
            check=False,
        )
    except (OSError, subprocess.SubprocessError) as exc:
        return f"systemd-run failed: {exc}"
    if proc.returncode != 0:
        return "systemd-run --user failed: " + proc.stderr.decode(errors="replace").strip()[:200]
    return ""


def probe() -> Cgroups:
    """Which kind this machine gives, tried for real (a cgroup made and removed)."""
    if not os.path.isdir(ROOT):
        return Cgroups("", "no cgroup filesystem at /sys/fs/cgroup")
    test = TaskLimits(max_processes=16, memory_bytes=64 << 20, cpus=1.0)
    if os.geteuid() == 0:
        unified = (ROOT / "cgroup.controllers").exists()
        prepare, kind = (_prepare_v2, "v2") if unified else (_prepare_v1, "v1")
        try:
            prepare()
            candidate = Cgroups(kind, "")
            group = candidate.make("probe", test)
            if group is not None:
                group.remove()
        except OSError as exc:
            log.info("cannot make task cgroups (%s): %s", kind, exc)
            return Cgroups("", f"cannot make cgroups here ({exc.strerror or exc})")
        where = ROOT / GROUP if kind == "v2" else ROOT / "{pids,memory,cpu}" / GROUP
        return Cgroups(kind, f"a cgroup {kind} per task under {where}")
    why = _systemd_user_works()
    if not why:
        return Cgroups("systemd-user", "a systemd user scope per task (systemd-run --user)")
    return Cgroups("", f"{why}; without it only rlimits and the process cap hold")
