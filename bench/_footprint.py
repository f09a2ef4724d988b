"""For the footprint benchmarks: a process tree's CPU time and memory, a local pool with a
logged-in worker home, and the BOINC client as the idle yardstick.

CPU time is read per thread from /proc/PID/task/TID/schedstat (nanoseconds, where
/proc/PID/stat counts 10 ms ticks): at 0.05 % of a core a 60 s window holds 30 ms, three
ticks. The sampler reads every thread once a second, so a thread that ends loses at most
its last second; the tick count of /proc/PID/stat, which keeps ended threads, is the
cross-check.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hivemind_worker.demo import LocalPool

USER = "bench"
PASSWORD = "bench-password"
TICK = os.sysconf("SC_CLK_TCK")


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load {one:.2f} / {five:.2f} / {fifteen:.2f} (1/5/15 min), {os.cpu_count()} cores"


def tree(pid: int) -> list[int]:
    """pid and its descendants, from /proc/PID/task/TID/children."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for tid in os.listdir(f"/proc/{current}/task"):
                path = f"/proc/{current}/task/{tid}/children"
                with contextlib.suppress(OSError, ValueError), open(path) as fh:
                    todo.extend(int(k) for k in fh.read().split())
    return found


def _stat_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime of all its threads


def rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


@dataclass
class Usage:
    cpu_seconds: float  # per-thread schedstat, summed over the tree
    tick_seconds: float  # /proc/PID/stat of the processes alive at both ends
    wall_seconds: float
    rss_bytes: int  # the tree's resident memory at the end
    rss_peak_bytes: int

    @property
    def cpu_percent(self) -> float:
        return self.cpu_seconds / self.wall_seconds * 100.0

    @property
    def rss_mib(self) -> float:
        return self.rss_bytes / 2**20


@dataclass
class Sampler:
    """CPU time and RSS of a process tree over a window, read once a second on a thread."""

    pid: int
    _threads: dict[tuple[int, int], tuple[int, int]] = field(default_factory=dict)
    _ticks: dict[int, float] = field(default_factory=dict)
    _peak: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def _read(self, first: bool) -> None:
        rss = 0
        for pid in tree(self.pid):
            with contextlib.suppress(OSError):
                rss += rss_bytes(pid)
                if first:
                    self._ticks[pid] = _stat_seconds(pid)
                for tid in os.listdir(f"/proc/{pid}/task"):
                    try:
                        with open(f"/proc/{pid}/task/{tid}/schedstat") as fh:
                            ns = int(fh.read().split()[0])
                    except OSError:
                        continue  # the thread ended meanwhile
                    key = (pid, int(tid))
                    start = self._threads[key][0] if key in self._threads else (ns if first else 0)
                    self._threads[key] = (start, ns)
        self._peak = max(self._peak, rss)
        self._rss = rss

    def measure(self, seconds: float) -> Usage:
        self._read(first=True)
        t0 = time.monotonic()
        while time.monotonic() - t0 < seconds:
            time.sleep(min(1.0, max(0.0, seconds - (time.monotonic() - t0))))
            self._read(first=False)
        wall = time.monotonic() - t0
        ticks = 0.0
        for pid, start in self._ticks.items():
            with contextlib.suppress(OSError):
                ticks += _stat_seconds(pid) - start
        cpu = sum(end - start for start, end in self._threads.values()) / 1e9
        return Usage(cpu, ticks, wall, self._rss, self._peak)


def measure_together(pids: dict[str, int], seconds: float) -> dict[str, Usage]:
    """Several trees over the same window (so that they see the same load)."""
    results: dict[str, Usage] = {}

    def one(name: str, pid: int) -> None:
        results[name] = Sampler(pid).measure(seconds)

    threads = [threading.Thread(target=one, args=item) for item in pids.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def stop(process: subprocess.Popen[bytes] | None, sig: int = signal.SIGTERM) -> None:
    if process is None or process.poll() is not None:
        return
    process.send_signal(sig)
    try:
        process.wait(30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(10)


@contextlib.contextmanager
def local_pool(home: Path, *, heartbeat_interval: int = 10) -> Iterator[LocalPool]:
    """The reference pool in its own process on loopback, with the bench account; the pool's
    default heartbeat interval (10 s) unless asked otherwise."""
    pool = LocalPool(home / "pool.db", heartbeat_interval=heartbeat_interval, lease_timeout=60)
    pool.add_user(USER, PASSWORD)
    pool.start()
    try:
        yield pool
    finally:
        pool.stop()


def worker_env(home: Path, **extra: str) -> dict[str, str]:
    """A worker home of its own; the process sandbox (with Docker enabled an idle worker
    would also ask the Docker daemon about images, which is the Docker benchmark's part)."""
    env = {**os.environ, "HIVEMIND_HOME": str(home), "PYTHONUNBUFFERED": "1",
           "DOCKER_ENABLED": "false", **extra}  # fmt: skip
    env.pop("NODE_ID", None)
    return env


def login(env: dict[str, str], address: str) -> None:
    subprocess.run(
        [sys.executable, "-m", "hivemind_worker", "login", "--node-pool", address,
         "--account", USER, "--password-stdin"],
        input=(PASSWORD + "\n").encode(), env=env, check=True, timeout=120,
        stdout=subprocess.DEVNULL,
    )  # fmt: skip


def wait_for_line(path: Path, text: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and text in path.read_text(errors="replace"):
            return
        if process.poll() is not None:
            raise RuntimeError(f"exited with {process.returncode}; see {path}")
        time.sleep(0.2)
    raise RuntimeError(f"no {text!r} within {timeout:.0f} s; see {path}")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class Boinc:
    """The BOINC client, attached to no project: what an idle volunteer client costs.

    `--no_info_fetch` keeps it from fetching the project list and version info (its only
    traffic when attached to nothing); GUI RPC stays on, on a free loopback port (it does
    not accept remote connections without --allow_remote_gui_rpc). `remote_peers()` lists
    any socket of it that reaches past loopback, so the benchmark can check.
    """

    def __init__(self, home: Path) -> None:
        self.home = home
        self.process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def available() -> bool:
        return shutil.which("boinc") is not None

    def start(self) -> int:
        self.home.mkdir(parents=True, exist_ok=True)
        log = (self.home / "stdout.log").open("wb")
        self.process = subprocess.Popen(
            ["boinc", "--dir", str(self.home), "--no_info_fetch", "--no_gpus",
             "--skip_cpu_benchmarks", "--gui_rpc_port", str(free_port())],
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        wait_for_line(self.home / "stdout.log", "Initialization complete", 60, self.process)
        return self.process.pid

    def remote_peers(self) -> list[str]:
        import psutil

        assert self.process is not None
        peers = []
        for conn in psutil.Process(self.process.pid).net_connections(kind="inet"):
            if conn.raddr and not conn.raddr.ip.startswith(("127.", "::1")):
                peers.append(f"{conn.raddr.ip}:{conn.raddr.port}")
        return peers

    def stop(self) -> None:
        stop(self.process)
