#!/usr/bin/env python3
"""Dispatch benchmark: task pick-up latency and per-task overhead against a bare subprocess.

Everything runs in this one process on loopback: the reference pool, the engine with the
process executor, and the baseline (the same trivial program started with `subprocess`).
Results are ratios against that baseline measured in the same run, because these machines
are noisy; they are written to docs/benchmarks.md between the dispatch markers.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import keyring
from _report import MemoryKeyring, write_section
from _worker import bench_worker

from hivemind_worker.config import Settings
from hivemind_worker.engine.events import Event, ResultDelivered, TaskFinished, TaskStarted
from hivemind_worker.engine.executors import cgroups
from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.pool.client import TaskQueueClient
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import MiB, Resources, TaskKind, TaskSpec

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "benchmarks.md"
SOURCE = "open('results/out.txt', 'w').write('ok')\n"


def baseline_runs(n: int) -> list[float]:
    """The same program, started directly: workspace, interpreter start, result file."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(n):
            work = Path(tmp) / f"t{i}"
            (work / "results").mkdir(parents=True)
            (work / "main.py").write_text(SOURCE)
            start = time.perf_counter()
            subprocess.run([sys.executable, "-E", "-s", "main.py"], cwd=work, check=True)
            times.append(time.perf_counter() - start)
    return times


async def worker_runs(n: int, home: Path) -> dict[str, list[float]]:
    """Per task, seconds: submit → started (pick-up), started → finished (execution),
    finished → delivered (archive upload and report), and submit → done at the pool (total)."""
    seen: dict[tuple[type, str], float] = {}

    def on_event(event: Event) -> None:
        if isinstance(event, TaskStarted | TaskFinished | ResultDelivered):
            seen[type(event), event.task_id] = time.perf_counter()

    def make(settings: Settings) -> ProcessExecutor:
        return ProcessExecutor(settings.work_dir)

    async with bench_worker(home, make, on_event=on_event) as bench:
        return await _measure(n, bench.queue, seen)


async def _measure(
    n: int, queue: TaskQueueClient, seen: dict[tuple[type, str], float]
) -> dict[str, list[float]]:
    phases: dict[str, list[float]] = {"pickup": [], "execute": [], "deliver": [], "total": []}
    spec = pb.TaskSpec(
        kind=pb.TASK_KIND_PYTHON,
        source=SOURCE,
        resources=pb.Resources(cpus=1, memory_bytes=256 << 20),
    )
    # One warm-up task: the engine connects and parks its first long-poll.
    await queue.wait_done([await queue.submit(spec)], timeout=60)
    for _ in range(n):
        t0 = time.perf_counter()
        task_id = await queue.submit(spec)
        await queue.wait_done([task_id], timeout=60, poll_interval=0.005)
        phases["total"].append(time.perf_counter() - t0)
        started = seen[TaskStarted, task_id]
        finished = seen[TaskFinished, task_id]
        phases["pickup"].append(started - t0)
        phases["execute"].append(finished - started)
        phases["deliver"].append(seen[ResultDelivered, task_id] - finished)
    return phases


async def wall_runs(n: int, work: Path) -> tuple[dict[str, list[float]], str]:
    """Seconds of the process executor's run() per task, alternating three executors: one
    behind namespaces only (the sandbox as it was before the mount view, Landlock, seccomp,
    the process cap and cgroups), one behind every wall but the cgroup, and one behind every
    wall this machine gives."""
    full = ProcessExecutor(work / "full")
    walls_only = ProcessExecutor(work / "walls")
    bare = ProcessExecutor(work / "bare")
    confinement = await full.confinement()
    limiter = await full.tree_limiter()
    assert confinement is not None and limiter is not None
    # The benchmark sets the executors' probed walls (private) to compare them in one run.
    bare._confinement = dataclasses.replace(confinement, walls="N", process_cap=False)
    bare._cgroups = cgroups.Cgroups("", "off for the comparison")
    walls_only._confinement = confinement
    walls_only._cgroups = cgroups.Cgroups("", "off for the comparison")
    runs = (("namespaces only", bare), ("walls", walls_only), ("walls and cgroup", full))
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    for i in range(n + 1):
        for name, executor in runs:
            task = TaskSpec(
                task_id=f"w{i}",
                lease_id="bench",
                kind=TaskKind.PYTHON,
                resources=Resources(1, 256 * MiB, 64 * MiB),
                timeout_seconds=60,
                source=SOURCE,
            )
            await executor.prepare(task)
            start = time.perf_counter()
            result = await executor.run(task)
            elapsed = time.perf_counter() - start
            await executor.cleanup(task.task_id)
            if result.archive is not None:
                result.archive.unlink()
            if i:  # the first round warms up (probes, page cache)
                times[name].append(elapsed)
    walls = f"{confinement.walls} ({confinement.summary()}); cgroup: {limiter.reason}"
    return times, walls


def write_report(section: str) -> None:
    write_section("dispatch", section, DOC)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=30, help="tasks per side (default 30)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    keyring.set_keyring(MemoryKeyring())

    base = baseline_runs(args.n)
    with tempfile.TemporaryDirectory() as tmp:
        phases = asyncio.run(worker_runs(args.n, Path(tmp)))
    with tempfile.TemporaryDirectory() as tmp:
        walls_times, walls = asyncio.run(wall_runs(args.n, Path(tmp)))
    bare_med = statistics.median(walls_times["namespaces only"])
    walls_med = statistics.median(walls_times["walls"])
    full_med = statistics.median(walls_times["walls and cgroup"])
    load = os.getloadavg()[0]
    base_med = statistics.median(base)
    med = {name: statistics.median(values) for name, values in phases.items()}
    total_med = med["total"]
    ratio = total_med / base_med
    section = "\n".join(
        [
            "## Dispatch (`bench/dispatch.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {sys.platform}, Python "
            f"{sys.version.split()[0]}, {args.n} tasks a side, medians. One trivial Python task "
            "at a time through the reference pool on loopback and the process executor, against "
            "the same program started directly with `subprocess` in the same run.",
            "",
            "| measure | median | vs. baseline |",
            "|---|---|---|",
            f"| baseline: `subprocess.run(python main.py)` | {base_med * 1000:.1f} ms | 1.00 |",
            f"| pick-up latency: submit → task started | {med['pickup'] * 1000:.1f} ms | "
            f"{med['pickup'] / base_med:.2f} |",
            f"| execution in the process sandbox: started → finished | "
            f"{med['execute'] * 1000:.1f} ms | {med['execute'] / base_med:.2f} |",
            "| delivery: spool to the outbox (fsync), upload, report | "
            f"{med['deliver'] * 1000:.1f} ms | {med['deliver'] / base_med:.2f} |",
            f"| worker total: submit → result stored at the pool | {total_med * 1000:.1f} ms | "
            f"{ratio:.2f} |",
            f"| worker overhead per task (total - baseline) | "
            f"{(total_med - base_med) * 1000:.1f} ms | {ratio - 1:.2f} |",
            "",
            "Pick-up is immediate because the worker's `GetAssignedTasks` long-poll is parked in "
            "the pool when the task arrives; the overhead is the sandbox launcher, workspace "
            "set-up, the result archive, the durable outbox write, the upload and the report.",
            "",
            "The process sandbox's walls, `run()` of the same task in the process executor, "
            "the three alternating in the same run:",
            "",
            "| walls | median run() | vs. namespaces only |",
            "|---|---|---|",
            f"| namespaces only (user, PID, network; the sandbox before issue 10) | "
            f"{bare_med * 1000:.1f} ms | 1.00 |",
            f"| every wall but the cgroup (mount view, Landlock, seccomp, no capabilities, "
            f"process cap) | {walls_med * 1000:.1f} ms | {walls_med / bare_med:.2f} |",
            f"| every wall and the task's cgroup (lowest CPU weight) | {full_med * 1000:.1f} ms | "
            f"{full_med / bare_med:.2f} |",
            "",
            f"Every wall here: {walls}. Load average {load:.1f} at the end: at the lowest CPU "
            "weight a task waits while other programs want the CPU, as it should (the "
            "courtesy), so the last row measures the machine's other load as much as the "
            "sandbox.",
        ]
    )
    print(section)
    if not args.no_write:
        write_report(section)
        print(f"\nwritten to {DOC.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
