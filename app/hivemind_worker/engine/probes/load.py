"""Other load: CPU used by everything but this worker and its tasks, and available memory.

Host CPU comes from /proc/stat (psutil.cpu_times); the worker's share is its own process
tree (the process sandbox's tasks are its descendants), including children it has reaped,
plus what `extra_cpu_seconds` reports (Docker containers, which are not its children).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Callable

import psutil

log = logging.getLogger(__name__)

# A share over less time than this is mostly noise (an evaluation woken right after
# another): the previous answer stands, and the next call measures from the earlier point.
MIN_SPAN_SECONDS = 0.5

# /proc/PID/task/TID/children needs CONFIG_PROC_CHILDREN, on in the common distributions.
_PROC_CHILDREN = os.path.exists(f"/proc/self/task/{os.getpid()}/children")


class LoadProbe:
    def __init__(
        self, pid: int | None = None, extra_cpu_seconds: Callable[[], float] | None = None
    ) -> None:
        self._pid = pid if pid is not None else os.getpid()
        self.extra_cpu_seconds = extra_cpu_seconds
        self._cpus = psutil.cpu_count() or 1
        self._last: tuple[float, float, float] | None = None  # (when, host busy, ours)
        self._last_percent: float | None = None

    def _host_busy(self) -> float:
        t = psutil.cpu_times()
        idle = t.idle + getattr(t, "iowait", 0.0)
        # guest time is already counted in user on Linux
        total = sum(t) - getattr(t, "guest", 0.0) - getattr(t, "guest_nice", 0.0)
        return total - idle

    def _ours(self) -> float:
        me = psutil.Process(self._pid)
        total = 0.0
        for process in [me, *self._descendants(me)]:
            try:
                t = process.cpu_times()
            except psutil.Error:
                continue  # ended between the listing and the read
            total += t.user + t.system + t.children_user + t.children_system
        if self.extra_cpu_seconds is not None:
            total += self.extra_cpu_seconds()
        return total

    def _descendants(self, me: psutil.Process) -> list[psutil.Process]:
        """The worker's process tree below it. On Linux from each thread's `children` list
        in procfs (cost grows with the worker's tree); psutil's walk reads every process on
        the machine, a hundred times more on a desktop, so it is only the fallback."""
        if not _PROC_CHILDREN:
            return me.children(recursive=True)
        found: list[psutil.Process] = []
        todo = [self._pid]
        while todo:
            pid = todo.pop()
            try:
                threads = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue  # ended meanwhile
            for tid in threads:
                try:
                    with open(f"/proc/{pid}/task/{tid}/children", encoding="ascii") as file:
                        kids = [int(k) for k in file.read().split()]
                except (OSError, ValueError):
                    continue
                for kid in kids:
                    todo.append(kid)
                    with contextlib.suppress(psutil.Error):
                        found.append(psutil.Process(kid))
        return found

    def other_cpu_percent(self) -> float | None:
        """% of the whole machine's CPU used by others since the last call; None the first
        time (there is nothing to compare with yet) or when it cannot be read."""
        if self._last is not None and time.monotonic() - self._last[0] < MIN_SPAN_SECONDS:
            return self._last_percent
        try:
            now, busy, ours = time.monotonic(), self._host_busy(), self._ours()
        except Exception as exc:
            log.debug("cannot read CPU times: %s", exc)
            return None
        last, self._last = self._last, (now, busy, ours)
        if last is None or now - last[0] <= 0:
            return None
        # Ours can step back when a task's processes end unreaped (their time leaves the
        # tree): count no negative share for us then.
        other = (busy - last[1]) - max(0.0, ours - last[2])
        percent = other / ((now - last[0]) * self._cpus) * 100.0
        self._last_percent = min(100.0, max(0.0, percent))
        return self._last_percent

    def memory_available_percent(self) -> float | None:
        try:
            memory = psutil.virtual_memory()
        except Exception as exc:
            log.debug("cannot read memory: %s", exc)
            return None
        return float(memory.available) / float(memory.total) * 100.0 if memory.total else None
