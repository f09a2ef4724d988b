#!/usr/bin/env python3
"""Courtesy benchmark: does the person's own CPU-bound work keep its speed while the worker runs?

A foreground workload (one busy Python process per core, each reporting how many loop
iterations it has done every 50 ms) runs throughout. Meanwhile the Docker executor runs
CPU-bound containers at the full CPU cap (one core each, on every core), and they are
frozen (the executor's pause()) and thawed in alternating slots of a second or two, so
the foreground's speed alone and shared is measured in many short pairs taken back to
back; other load on the machine drifts, and a pair sees it on both sides. Three placements
of the containers:

- Docker's default scheduling (cpu_shares 1024, Docker's default parent cgroup);
- the lowest cpu_shares (2) per container only;
- the worker's placement: lowest cpu_shares under a parent cgroup of minimal CPU weight
  (cgroup v1: cpu.shares=2; v2: cpu.weight=1), made by `courtesy_cgroup_parent`.

The process sandbox (ProcessExecutor, for volunteers without Docker) is measured the same
way: CPU-bound python tasks frozen and thawed by its pause() and resume(), each in the cgroup
the executor makes (cpu.shares=2 / cpu.weight=1, or a systemd user scope with CPUWeight=1),
or only niced when the machine gives no cgroup.

The score is the median over pairs of foreground speed shared / alone. The containers' own
CPU use with and without the foreground shows they still take the idle cycles. Needs root
and a local Docker engine with the tests' image (`python3 build.py test-image`) for the
Docker rows; `--only process` needs neither.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil
from _report import write_section

from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.engine.executors.base import Executor
from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.tasks import MiB, Resources, TaskKind, TaskSpec

IMAGE = "hivemind-test-python:bookworm"
# time.monotonic() is CLOCK_MONOTONIC, shared by every process on the machine.
FOREGROUND = """
import sys, time
n, next_report = 0, 0.0
while True:
    for _ in range(20000):
        n += 1
    now = time.monotonic()
    if now >= next_report:
        print(now, n, flush=True)
        next_report = now + 0.05
"""
BUSY = "while True:\n    pass\n"
SETTLE = 0.25  # seconds after each freeze or thaw left out of the measurement


class Foreground:
    """Busy processes, one per core, whose progress can be read for any time interval."""

    def __init__(self, procs: int) -> None:
        self._procs = [
            subprocess.Popen(
                [sys.executable, "-c", FOREGROUND], stdout=subprocess.PIPE, text=True, bufsize=1
            )
            for _ in range(procs)
        ]
        self._series: list[tuple[list[float], list[int]]] = [([], []) for _ in self._procs]
        self._threads = [
            threading.Thread(target=self._read, args=(i,), daemon=True)
            for i in range(len(self._procs))
        ]
        for thread in self._threads:
            thread.start()

    def _read(self, index: int) -> None:
        stdout = self._procs[index].stdout
        assert stdout is not None
        times, counts = self._series[index]
        for line in stdout:
            t, n = line.split()
            times.append(float(t))
            counts.append(int(n))

    def rate(self, start: float, end: float) -> float:
        """Iterations per second summed over the processes between two monotonic times."""

        def at(times: list[float], counts: list[int], t: float) -> float:
            i = bisect.bisect_left(times, t)
            if i == 0 or i >= len(times):
                raise ValueError("interval outside the reports")
            t0, t1 = times[i - 1], times[i]
            return counts[i - 1] + (counts[i] - counts[i - 1]) * (t - t0) / (t1 - t0)

        return sum(
            (at(times, counts, end) - at(times, counts, start)) / (end - start)
            for times, counts in self._series
        )

    async def reported_past(self, t: float, limit: float = 10.0) -> None:
        """Wait until every process has reported after `t` (a loaded machine delays them)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline and any(  # noqa: ASYNC110 - polled
            not times or times[-1] <= t for times, _ in self._series
        ):
            await asyncio.sleep(0.05)

    def stop(self) -> None:
        for p in self._procs:
            p.kill()
            p.wait()


def container_cpu(executor: Executor, ids: list[str]) -> list[tuple[float, float]]:
    """(monotonic time, CPU seconds) of each container (or process-sandbox task tree) now."""
    if isinstance(executor, ProcessExecutor):
        return [(time.monotonic(), tree_cpu(executor, task_id)) for task_id in ids]
    assert isinstance(executor, dockerx.DockerExecutor)
    out = []
    for task_id in ids:
        container = executor.container(task_id)
        assert container is not None
        stats = executor.client.api.stats(container.id, stream=False, one_shot=True)
        # Timed per container: one stats call takes tens of milliseconds.
        out.append((time.monotonic(), stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9))
    return out


def tree_cpu(executor: ProcessExecutor, task_id: str) -> float:
    """CPU seconds of a process-sandbox task's tree (its launcher and every descendant)."""
    run = executor._running[task_id]  # the benchmark looks inside; the executor samples at 1 Hz
    leader = run.leader or psutil.Process(run.proc.pid)
    total = 0.0
    for p in [leader, *leader.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + t.children_user + t.children_system
    return total


def cores_used(before: list[tuple[float, float]], after: list[tuple[float, float]]) -> float:
    return sum((u2 - u1) / (t2 - t1) for (t1, u1), (t2, u2) in zip(before, after, strict=True))


async def measure(
    work: Path, cores: int, slot: float, pairs: int, *, cgroup_parent: str, cpu_shares: int
) -> tuple[float, float, float]:
    """(median foreground speed shared / alone, containers' cores with the foreground,
    containers' cores without it); cpu_shares 0 stands for the process sandbox."""
    executor: Executor
    if cpu_shares == 0:
        executor = ProcessExecutor(work)
    else:
        executor = dockerx.DockerExecutor(
            dockerx.connect(),
            work,
            "bench-courtesy",
            python_image=IMAGE,
            pull_policy="never",
            cgroup_parent=cgroup_parent,
            cpu_shares=cpu_shares,
        )
    ids = [f"busy{i}" for i in range(cores)]
    runs = []
    for task_id in ids:
        task = TaskSpec(
            task_id=task_id,
            lease_id="bench",
            kind=TaskKind.PYTHON,
            resources=Resources(1, 64 * MiB, 16 * MiB),
            timeout_seconds=3600,
            source=BUSY,
        )
        await executor.prepare(task)
        runs.append(asyncio.create_task(executor.run(task)))
    ratios: list[float] = []
    used: list[float] = []
    foreground: Foreground | None = None
    try:
        while not started(executor, ids):  # noqa: ASYNC110 - polled
            await asyncio.sleep(0.05)
        before = await asyncio.to_thread(container_cpu, executor, ids)
        await asyncio.sleep(2.0)
        alone = cores_used(before, await asyncio.to_thread(container_cpu, executor, ids))
        foreground = Foreground(cores)
        await asyncio.sleep(0.5)  # the interpreters start
        for _ in range(pairs):
            await executor.pause()
            await asyncio.sleep(SETTLE)
            solo_start = time.monotonic()
            await asyncio.sleep(slot)
            solo_end = time.monotonic()
            await executor.resume()
            await asyncio.sleep(SETTLE)
            shared_start = time.monotonic()
            cpu_before = await asyncio.to_thread(container_cpu, executor, ids)
            await asyncio.sleep(slot)
            cpu_after = await asyncio.to_thread(container_cpu, executor, ids)
            shared_end = time.monotonic()
            await foreground.reported_past(shared_end)
            solo = foreground.rate(solo_start, solo_end)
            ratios.append(foreground.rate(shared_start, shared_end) / solo)
            used.append(cores_used(cpu_before, cpu_after))
    finally:
        if foreground is not None:
            foreground.stop()
        await executor.resume()
        for task_id in ids:
            await executor.cancel(task_id)
        await asyncio.gather(*runs)
        for task_id in ids:
            await executor.cleanup(task_id)
        if isinstance(executor, dockerx.DockerExecutor):
            executor.client.close()
        else:
            await executor.close()
    return statistics.median(ratios), statistics.median(used), alone


def started(executor: Executor, ids: list[str]) -> bool:
    if isinstance(executor, ProcessExecutor):
        return all(i in executor.usage() and executor._running[i].leader for i in ids)
    assert isinstance(executor, dockerx.DockerExecutor)
    return all(executor.container(i) is not None for i in ids)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slot", type=float, default=1.5, help="seconds per alone/shared slot")
    parser.add_argument("--pairs", type=int, default=10, help="alone/shared pairs per placement")
    choices = ["default", "shares", "worker", "process"]
    parser.add_argument("--only", choices=choices, help="one placement")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    from hivemind_worker.engine.executors import cgroups

    limiter = cgroups.probe()
    process_row = (
        f"process sandbox: {limiter.reason}" if limiter.kind else "process sandbox: nice 10 only",
        "",
        0,
    )
    if args.only == "process":
        info: dict[str, object] = {}
        placements = [process_row]
    else:
        client = dockerx.connect()
        info = client.info()
        client.close()
        parent, how = dockerx.courtesy_cgroup_parent(
            str(info.get("CgroupDriver", "")), str(info.get("CgroupVersion", "1"))
        )
        if not parent:
            sys.exit(f"cannot make the courtesy cgroup here: {how}")
        placements = [
            ("Docker default (cpu_shares 1024, default parent)", "", 1024),
            ("lowest cpu_shares (2), default parent", "", dockerx.CPU_SHARES),
            (f"worker: cpu_shares 2 under {how}", parent, dockerx.CPU_SHARES),
            process_row,
        ]
        if args.only:
            placements = [placements[choices.index(args.only)]]
    results: dict[str, tuple[float, float, float]] = {}
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    with tempfile.TemporaryDirectory() as tmp:
        for index, (name, cgroup_parent, shares) in enumerate(placements):
            results[name] = asyncio.run(
                measure(
                    Path(tmp) / f"p{index}",
                    cores,
                    args.slot,
                    args.pairs,
                    cgroup_parent=cgroup_parent,
                    cpu_shares=shares,
                )
            )
            print(f"{name}: {results[name][0]:.2f}", file=sys.stderr)
    rows = [
        "| placement of the worker's containers (or tasks) | foreground speed vs. alone | "
        "containers' cores with foreground | containers' cores alone |",
        "|---|---|---|---|",
    ]
    for name, (ratio, shared, alone) in results.items():
        rows.append(f"| {name} | {ratio:.2f} | {shared:.2f} | {alone:.2f} |")
    section = "\n".join(
        [
            "## Courtesy (`bench/courtesy.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {sys.platform}, {cores} cores, Docker "
            f"{info.get('ServerVersion')}, cgroup v{info.get('CgroupVersion')} "
            f"({info.get('CgroupDriver')} driver), load average {load:.1f} at the start. "
            f"Foreground: {cores} busy Python processes (the person's program). Worker: "
            f"{cores} CPU-bound containers of one core each (the full cap), frozen and thawed "
            f"in {args.pairs} pairs of {args.slot:g} s slots; speed is the foreground's loop "
            "iterations per second, median over the pairs of shared / alone. The process "
            "sandbox row runs the same CPU-bound tasks in the process executor instead.",
            "",
            *rows,
            "",
            "Containers' cores alone shows the worker still uses the idle cycles; how the "
            "parent cgroup is set up on cgroup v1, v2 and Docker Desktop is in "
            "docs/docker.md.",
        ]
    )
    print(section)
    if not args.no_write:
        write_section("courtesy", section)
        print("\nwritten to docs/benchmarks.md")


if __name__ == "__main__":
    main()
