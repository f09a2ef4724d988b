#!/usr/bin/env python3
"""Docker overhead benchmark: per-task cost of the worker against a bare `docker run`, warm
sandboxes' start, throughput.

In one run, on this machine:
- per task: `docker run --rm --network none IMAGE true` from the CLI, and the same trivial
  container task (`true` in IMAGE) submitted to the reference pool on loopback and run by the
  engine with the Docker executor, one at a time, alternating (medians, as ratios);
- start: from prepare() to the first line of a trivial python task, in a new container and in
  a warm sandbox (warm.py), against `docker run --rm IMAGE python3 -c ...` from the CLI to the
  same first line, alternating; and a trivial python task through the pool with warm
  sandboxes, submit to result stored;
- throughput: a batch of trivial container tasks, then of python tasks (warm), with 1, 2 and
  4 slots.
Results go to docs/benchmarks.md between the docker-overhead markers, with the load average
at the start. Needs a local Docker engine with the tests' image (`python3 build.py
test-image`). Every container it makes carries a node label of this run alone, and only those
are removed at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

import keyring
from _report import MemoryKeyring, write_section

from hivemind_worker.config import load_settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.engine.engine import WorkerEngine
from hivemind_worker.engine.events import Event, ResultDelivered, TaskFinished, TaskStarted
from hivemind_worker.engine.executors import docker as dockerx
from hivemind_worker.engine.pool_client import NodePoolClient
from hivemind_worker.paths import default_paths
from hivemind_worker.pool.client import TaskQueueClient
from hivemind_worker.pool.server import PoolConfig, PoolServer
from hivemind_worker.pool.store import PoolStore
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import MiB, Resources, TaskKind, TaskSpec

RUN = f"bench-{os.getpid()}"  # in every node id of this run: its containers' label
IMAGE = "hivemind-test-python:bookworm"
RESOURCES = pb.Resources(cpus=0.5, memory_bytes=64 << 20, disk_bytes=16 << 20)
SPEC = pb.TaskSpec(kind=pb.TASK_KIND_CONTAINER, image=IMAGE, argv=["true"], resources=RESOURCES)
PYTHON_SPEC = pb.TaskSpec(kind=pb.TASK_KIND_PYTHON, source="pass\n", resources=RESOURCES)
# The first line of the python task of the start measure: when it ran, on this machine's clock.
STAMP = "import time\nopen('results/t', 'w').write(repr(time.time()))\n"


def bare_docker_run() -> float:
    start = time.perf_counter()
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", IMAGE, "true"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


def bare_docker_start() -> tuple[float, float]:
    """`docker run --rm IMAGE python3 -c STAMP-like`: (to its first line, to its end)."""
    start = time.time()
    done = subprocess.run(
        ["docker", "run", "--rm", "--network", "none", IMAGE, "python3", "-c",
         "import time; print(repr(time.time()))"],
        check=True,
        capture_output=True,
        text=True,
    )  # fmt: skip
    return float(done.stdout.strip()) - start, time.time() - start


def stamp_task(n: int) -> TaskSpec:
    return TaskSpec(
        task_id=f"start-{n}",
        lease_id="l",
        kind=TaskKind.PYTHON,
        source=STAMP,
        resources=Resources(0.5, 64 * MiB, 16 * MiB),
        timeout_seconds=60,
    )


async def task_start(executor: dockerx.DockerExecutor, n: int) -> float:
    """prepare() to the task's first line, in seconds; the task is then cleaned up."""
    if executor.warm is not None:
        await executor.warm.settle()  # a sandbox is ready, as for a task that comes later
    task = stamp_task(n)
    start = time.time()
    await executor.prepare(task)
    result = await executor.run(task)
    assert result.status.value == "succeeded" and result.archive is not None, result.error
    with tarfile.open(result.archive) as tar:
        member = tar.extractfile("results/t")
        assert member is not None
        first_line = float(member.read())
    result.archive.unlink()
    await executor.cleanup(task.task_id)
    return first_line - start


async def measure_start(home: Path, n: int) -> dict[str, list[float]]:
    """The start measure, the three alternating; the warm one must run warm every time."""
    cold = dockerx.DockerExecutor(
        dockerx.connect(), home / "cold", f"{RUN}-cold", python_image=IMAGE, pull_policy="never"
    )
    warm = dockerx.DockerExecutor(
        dockerx.connect(), home / "warm", f"{RUN}-warm", python_image=IMAGE, pull_policy="never",
        warm=True,
    )  # fmt: skip
    times: dict[str, list[float]] = {"bare": [], "bare_total": [], "cold": [], "warm": []}
    try:
        await task_start(warm, -1)  # the first makes the first sandbox
        for i in range(n):
            first, total = await asyncio.to_thread(bare_docker_start)
            times["bare"].append(first)
            times["bare_total"].append(total)
            times["cold"].append(await task_start(cold, i))
            times["warm"].append(await task_start(warm, i))
        assert warm.warm is not None and warm.warm.taken == n, "a task did not run warm"
    finally:
        await cold.close()
        await warm.close()
    return times


class Bench:
    """A pool on loopback and engines with the Docker executor, in this process."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.pool: PoolServer | None = None
        self.token = ""

    async def start(self) -> None:
        db = self.home / "pool.db"
        store = PoolStore(db)
        store.add_user("bench", "bench-password")
        store.close()
        self.pool = PoolServer(
            PoolConfig(db_path=db, listen="127.0.0.1:0", heartbeat_interval=5, max_wait=30)
        )
        await self.pool.start()
        client = NodePoolClient(self.pool.address)
        self.token = await client.login("bench", "bench-password")
        await client.close()

    async def stop(self) -> None:
        if self.pool is not None:
            await self.pool.stop()

    def engine(self, name: str, concurrent: int) -> WorkerEngine:
        assert self.pool is not None
        name = f"{RUN}-{name}"
        paths = default_paths(self.home / name)
        paths.ensure()
        settings = load_settings(
            paths,
            env={},
            overrides={
                "node_pool_address": self.pool.address,
                "account": "bench",
                "node_id": name,
                "max_concurrent_tasks": concurrent,
                "max_cpu_cores": 2,
                "max_memory_gb": 1,
            },
        )
        credentials = CredentialStore(paths)
        credentials.set_token(self.pool.address, "bench", self.token)
        executor = dockerx.DockerExecutor(
            dockerx.connect(), settings.work_dir, name, python_image=IMAGE, pull_policy="never",
            warm=True,  # as the setting's default; container tasks never run warm
        )  # fmt: skip
        return WorkerEngine(
            settings,
            node_id=name,
            credentials=credentials,
            executor=executor,
            outbox_dir=paths.outbox_dir,
        )

    async def per_task(self, n: int, spec: pb.TaskSpec = SPEC) -> dict[str, list[float]]:
        """One task at a time: submit → done at the pool, and the execution phase, each
        right after a bare `docker run` (the baseline), so drifting load hits both alike."""
        assert self.pool is not None
        engine = self.engine(f"single-{spec.kind}", 1)
        seen: dict[tuple[type, str], float] = {}

        def on_event(event: Event) -> None:
            if isinstance(event, TaskStarted | TaskFinished | ResultDelivered):
                seen[type(event), event.task_id] = time.perf_counter()

        engine.subscribe(on_event)
        runner = asyncio.create_task(engine.run())
        queue = TaskQueueClient(self.pool.address)
        await queue.login("bench", "bench-password")
        phases: dict[str, list[float]] = {"baseline": [], "execute": [], "total": []}
        try:
            await queue.wait_done([await queue.submit(spec)], timeout=60)  # warm-up
            for _ in range(n):
                phases["baseline"].append(await asyncio.to_thread(bare_docker_run))
                await asyncio.sleep(0.5)  # the next sandbox is made meanwhile, as between tasks
                t0 = time.perf_counter()
                task_id = await queue.submit(spec)
                infos = await queue.wait_done([task_id], timeout=60, poll_interval=0.005)
                assert infos[task_id].status == pb.TASK_STATUS_SUCCEEDED, infos[task_id].error
                phases["total"].append(time.perf_counter() - t0)
                phases["execute"].append(seen[TaskFinished, task_id] - seen[TaskStarted, task_id])
        finally:
            await queue.close()
            engine.shutdown()
            await runner
        return phases

    async def throughput(self, concurrent: int, tasks: int, spec: pb.TaskSpec = SPEC) -> float:
        """Tasks per second for a batch submitted at once."""
        assert self.pool is not None
        engine = self.engine(f"c{concurrent}-{spec.kind}", concurrent)
        runner = asyncio.create_task(engine.run())
        queue = TaskQueueClient(self.pool.address)
        await queue.login("bench", "bench-password")
        try:
            # Warm-up: as many tasks as slots, so each slot has had its first container.
            warm_up = [await queue.submit(spec) for _ in range(concurrent)]
            await queue.wait_done(warm_up, timeout=120)
            await asyncio.sleep(1.0)  # their sandboxes made, as on a worker between batches
            t0 = time.perf_counter()
            ids = [await queue.submit(spec) for _ in range(tasks)]
            infos = await queue.wait_done(ids, timeout=300, poll_interval=0.02)
            elapsed = time.perf_counter() - t0
            failed = [i for i in infos.values() if i.status != pb.TASK_STATUS_SUCCEEDED]
            assert not failed, [(pb.TaskStatus.Name(i.status), i.error) for i in failed]
        finally:
            await queue.close()
            engine.shutdown()
            await runner
        return tasks / elapsed


async def measure(n: int, tasks: int) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        await bench.start()
        try:
            return {
                "container": await bench.per_task(n),
                "start": await measure_start(Path(tmp), n),
                "python": await bench.per_task(n, PYTHON_SPEC),
                "rates": {c: await bench.throughput(c, tasks) for c in (1, 2, 4)},
                "python_rates": {
                    c: await bench.throughput(c, tasks, PYTHON_SPEC) for c in (1, 2, 4)
                },
            }
        finally:
            await bench.stop()
            remove_run_containers()


def remove_run_containers() -> None:
    """Remove what this run left, by its own node label only (the engine is shared)."""
    found = subprocess.run(
        ["docker", "ps", "-aq", "--filter", f"label={dockerx.LABEL_NODE}"],
        capture_output=True, text=True, check=False,
    ).stdout.split()  # fmt: skip
    mine = []
    for container in found:
        node = subprocess.run(
            ["docker", "inspect", "-f", f'{{{{index .Config.Labels "{dockerx.LABEL_NODE}"}}}}',
             container],
            capture_output=True, text=True, check=False,
        ).stdout.strip()  # fmt: skip
        if node.startswith(f"{RUN}-"):
            mine.append(container)
    if mine:
        print(f"removing {len(mine)} container(s) this run left", file=sys.stderr)
        subprocess.run(["docker", "rm", "-f", *mine], check=False, capture_output=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="tasks a side for the overhead")
    parser.add_argument("--tasks", type=int, default=16, help="tasks per throughput batch")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    keyring.set_keyring(MemoryKeyring())

    load = os.getloadavg()
    figures = asyncio.run(measure(args.n, args.tasks))
    phases = figures["container"]
    start = figures["start"]
    python = figures["python"]
    rates = figures["rates"]
    python_rates = figures["python_rates"]
    assert isinstance(phases, dict) and isinstance(start, dict) and isinstance(python, dict)
    assert isinstance(rates, dict) and isinstance(python_rates, dict)
    med = {k: statistics.median(v) for k, v in phases.items()}
    smed = {k: statistics.median(v) for k, v in start.items()}
    pmed = {k: statistics.median(v) for k, v in python.items()}
    base = med["baseline"]

    def ms(seconds: float) -> str:
        return f"{seconds * 1000:.0f} ms"

    section = "\n".join(
        [
            "## Docker overhead (`bench/docker_overhead.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {sys.platform}, {os.cpu_count()} CPUs, "
            f"load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f} (1 / 5 / 15 min) at "
            f"the start; medians of {args.n}, each side measured alternately in the same run.",
            "",
            f"**Per task.** A trivial container task (`true` in `{IMAGE}`) through the "
            "reference pool on loopback and the Docker executor, against `docker run --rm "
            "--network none IMAGE true` from the CLI:",
            "",
            "| measure | median | vs. `docker run` |",
            "|---|---|---|",
            f"| `docker run --rm` | {ms(base)} | 1.00 |",
            f"| executor: task started → finished | {ms(med['execute'])} | "
            f"{med['execute'] / base:.2f} |",
            f"| worker total: submit → result stored at the pool | {ms(med['total'])} | "
            f"{med['total'] / base:.2f} |",
            "",
            "**Start.** From the executor's prepare() to the first line of a trivial python "
            "task, against `docker run --rm IMAGE python3 -c ...` from the CLI to the same "
            "first line (and to its end):",
            "",
            "| measure | median | vs. `docker run` to the first line | vs. whole `docker run` |",
            "|---|---|---|---|",
            f"| `docker run --rm`, to the first line | {ms(smed['bare'])} | 1.00 | "
            f"{smed['bare'] / smed['bare_total']:.2f} |",
            f"| task in a new container | {ms(smed['cold'])} | "
            f"{smed['cold'] / smed['bare']:.2f} | {smed['cold'] / smed['bare_total']:.2f} |",
            f"| task in a warm sandbox | {ms(smed['warm'])} | "
            f"{smed['warm'] / smed['bare']:.2f} | {smed['warm'] / smed['bare_total']:.2f} |",
            "",
            "A trivial python task (`pass`) through the pool with warm sandboxes:",
            "",
            "| measure | median | vs. `docker run ... true` |",
            "|---|---|---|",
            f"| `docker run --rm` | {ms(pmed['baseline'])} | 1.00 |",
            f"| executor: task started → finished | {ms(pmed['execute'])} | "
            f"{pmed['execute'] / pmed['baseline']:.2f} |",
            f"| worker total: submit → result stored at the pool | {ms(pmed['total'])} | "
            f"{pmed['total'] / pmed['baseline']:.2f} |",
            "",
            f"**Throughput**, {args.tasks} trivial tasks submitted at once (after a warm-up "
            "task per slot):",
            "",
            "| slots | container tasks per second | python tasks (warm sandboxes) per second |",
            "|---|---|---|",
            *(f"| {c} | {rates[c]:.2f} | {python_rates[c]:.2f} |" for c in (1, 2, 4)),
            "",
            "Per task, the executor creates and starts the container, waits for it (following "
            "its output and usage meanwhile), inspects it only for an exit other than 0, reads "
            "the log file only when the followed output may have missed some, and packs the "
            "results from the bind-mounted workspace; the spool to the outbox, the upload, "
            "the report and the container's removal follow. A warm sandbox (docs/docker.md) "
            "has the create and start done before its task comes: taking the task is writing "
            "its inputs and one message to a named pipe; after the task a fresh sandbox is "
            "made in the background.",
        ]
    )
    print(section)
    if not args.no_write:
        write_section("docker-overhead", section)
        print("\nwritten to docs/benchmarks.md")


if __name__ == "__main__":
    main()
