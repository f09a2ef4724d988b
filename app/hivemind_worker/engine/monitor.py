"""Host metrics from psutil: CPU, memory and the disk that holds the task workspaces."""

from __future__ import annotations

import os
import platform
import socket
from dataclasses import dataclass
from pathlib import Path

import psutil


@dataclass(frozen=True)
class HostSample:
    cpu_percent: float
    memory_used_bytes: int
    memory_total_bytes: int
    disk_free_bytes: int
    disk_total_bytes: int


@dataclass(frozen=True)
class HostInfo:
    hostname: str
    cpu_cores: int
    memory_bytes: int
    disk_bytes: int
    platform: str


class HostMonitor:
    """Samples the host. Blocking (a few syscalls); the engine calls it through to_thread."""

    def __init__(self, work_dir: Path) -> None:
        self.work_dir = work_dir
        # The first cpu_percent(None) call primes psutil's counters and returns 0.0.
        psutil.cpu_percent(interval=None)

    def _disk(self) -> tuple[int, int]:
        path = self.work_dir
        while not path.exists() and path != path.parent:
            path = path.parent
        usage = psutil.disk_usage(str(path))
        return usage.free, usage.total

    def sample(self) -> HostSample:
        mem = psutil.virtual_memory()
        free, total = self._disk()
        return HostSample(
            cpu_percent=psutil.cpu_percent(interval=None),
            memory_used_bytes=mem.total - mem.available,
            memory_total_bytes=mem.total,
            disk_free_bytes=free,
            disk_total_bytes=total,
        )

    def info(self) -> HostInfo:
        _, total = self._disk()
        return HostInfo(
            hostname=socket.gethostname(),
            cpu_cores=os.cpu_count() or 1,
            memory_bytes=psutil.virtual_memory().total,
            disk_bytes=total,
            platform=platform.platform(),
        )
