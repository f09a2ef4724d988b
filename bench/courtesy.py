#!/usr/bin/env python3
"""Courtesy benchmark: does the person's own CPU-bound work keep its speed while the worker runs?

A foreground workload (one busy Python process per core, counting loop iterations for a
fixed time) runs alone, then while the Docker executor runs CPU-bound containers at the full
CPU cap (one core each, on every core), in three placements:

- Docker's default scheduling (cpu_shares 1024, Docker's default parent cgroup);
- the lowest cpu_shares (2) per container only;
- the worker's placement: lowest cpu_shares under a parent cgroup of minimal CPU weight
  (cgroup v1: cpu.shares=2; v2: cpu.weight=1), made by `courtesy_cgroup_parent`.

The score is foreground throughput with the containers / alone. The containers' own CPU use
with and without the foreground shows they still take the idle cycles. Needs root and a
local Docker engine with the tests' image (`python3 build.py test-image`).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import write_section

from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.engine.tasks import MiB, Resources, TaskKind, TaskSpec

IMAGE = "hivemind-test-python:bookworm"
FOREGROUND = """
import sys, time
end = time.perf_counter() + float(sys.argv[1])
n = 0
while True:
    for _ in range(10000):
        n += 1
    if time.perf_counter() >= end:
        break
print(n)
"""
BUSY = "while True:\n    pass\n"


def foreground(seconds: float, procs: int) -> float:
    """Loop iterations per second summed over `procs` busy processes."""
    started = [
        subprocess.Popen(
            [sys.executable, "-c", FOREGROUND, str(seconds)], stdout=subprocess.PIPE, text=True
        )
        for _ in range(procs)
    ]
    total = 0
    for p in started:
        out, _ = p.communicate(timeout=seconds + 60)
        total += int(out)
    return total / seconds


def container_cpu(executor: dockerx.DockerExecutor, ids: list[str], seconds: float) -> float:
    """CPU seconds per second the containers used over `seconds` (cores' worth)."""

    def total() -> float:
        used = 0.0
        for task_id in ids:
            container = executor.container(task_id)
            assert container is not None
            stats = executor.client.api.stats(container.id, stream=False, one_shot=True)
            used += stats["cpu_stats"]["cpu_usage"]["total_usage"] / 1e9
        return used

    before = total()
    time.sleep(seconds)
    return (total() - before) / seconds


async def with_containers(
    work: Path, cores: int, seconds: float, *, cgroup_parent: str, cpu_shares: int
) -> tuple[float, float, float]:
    """(foreground rate, container cores used with it, container cores used alone)."""
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
            timeout_seconds=600,
            source=BUSY,
        )
        await executor.prepare(task)
        runs.append(asyncio.create_task(executor.run(task, task.resources)))
    try:
        while any(executor.container(i) is None for i in ids):  # noqa: ASYNC110 - polled
            await asyncio.sleep(0.05)
        alone = await asyncio.to_thread(container_cpu, executor, ids, 2.0)
        fg_task = asyncio.create_task(asyncio.to_thread(foreground, seconds, cores))
        await asyncio.sleep(0.5)  # measure the containers while the foreground is running
        shared = await asyncio.to_thread(container_cpu, executor, ids, seconds - 1.5)
        rate = await fg_task
    finally:
        for task_id in ids:
            await executor.cancel(task_id)
        await asyncio.gather(*runs)
        for task_id in ids:
            await executor.cleanup(task_id)
        executor.client.close()
    return rate, shared, alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=6.0, help="per measurement")
    parser.add_argument("--repeat", type=int, default=3, help="measurements per placement")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    cores = os.cpu_count() or 1
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
    ]
    # Solo and shared runs are paired and interleaved: other load on the machine drifts, and
    # each ratio compares two measurements taken back to back.
    results: dict[str, list[tuple[float, float, float]]] = {name: [] for name, _, _ in placements}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.repeat):
            for name, cgroup_parent, shares in placements:
                solo = foreground(args.seconds, cores)
                rate, shared, alone = asyncio.run(
                    with_containers(
                        Path(tmp) / f"w{round_}",
                        cores,
                        args.seconds,
                        cgroup_parent=cgroup_parent,
                        cpu_shares=shares,
                    )
                )
                results[name].append((rate / solo, shared, alone))
                print(f"{name}: {rate / solo:.2f}", file=sys.stderr)
    rows = [
        "| placement of the worker's containers | foreground speed vs. alone | "
        "containers' cores with foreground | containers' cores alone |",
        "|---|---|---|---|",
    ]
    for name, values in results.items():
        ratio = statistics.median(v[0] for v in values)
        shared = statistics.median(v[1] for v in values)
        alone = statistics.median(v[2] for v in values)
        rows.append(f"| {name} | {ratio:.2f} | {shared:.2f} | {alone:.2f} |")
    section = "\n".join(
        [
            "## Courtesy (`bench/courtesy.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {sys.platform}, {cores} cores, Docker "
            f"{info.get('ServerVersion')}, cgroup v{info.get('CgroupVersion')} "
            f"({info.get('CgroupDriver')} driver); medians of {args.repeat} rounds of "
            f"{args.seconds:g} s, each against a solo run just before. Foreground: {cores} "
            f"busy Python processes (the person's program). Worker: {cores} CPU-bound "
            "containers of one core each (the full cap). "
            "Speed is foreground loop iterations per second.",
            "",
            *rows,
            "",
            "Containers' cores alone shows the worker still uses every idle cycle; how the "
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
