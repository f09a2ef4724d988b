#!/usr/bin/env python3
"""Docker overhead benchmark: per-task cost of the worker against a bare `docker run`, throughput.

In one run, on this machine: `docker run --rm --network none IMAGE true` from the CLI, and
the same trivial container task (`true` in IMAGE) submitted to the reference pool on
loopback and run by the engine with the Docker executor, one at a time (median of N, as a
ratio); then the throughput of a batch of trivial tasks with 1, 2 and 4 running at once.
Results go to docs/benchmarks.md between the docker-overhead markers. Needs a local Docker
engine with the tests' image (`python3 build.py test-image`).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
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

IMAGE = "hivemind-test-python:bookworm"
SPEC = pb.TaskSpec(
    kind=pb.TASK_KIND_CONTAINER,
    image=IMAGE,
    argv=["true"],
    resources=pb.Resources(cpus=0.5, memory_bytes=64 << 20, disk_bytes=16 << 20),
)


def bare_docker_run() -> float:
    start = time.perf_counter()
    subprocess.run(
        ["docker", "run", "--rm", "--network", "none", IMAGE, "true"],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return time.perf_counter() - start


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
            dockerx.connect(), settings.work_dir, name, python_image=IMAGE, pull_policy="never"
        )
        return WorkerEngine(
            settings,
            node_id=name,
            credentials=credentials,
            executor=executor,
            outbox_dir=paths.outbox_dir,
        )

    async def per_task(self, n: int) -> dict[str, list[float]]:
        """One task at a time: submit → done at the pool, and the execution phase, each
        right after a bare `docker run` (the baseline), so drifting load hits both alike."""
        assert self.pool is not None
        engine = self.engine("single", 1)
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
            await queue.wait_done([await queue.submit(SPEC)], timeout=60)  # warm-up
            for _ in range(n):
                phases["baseline"].append(await asyncio.to_thread(bare_docker_run))
                t0 = time.perf_counter()
                task_id = await queue.submit(SPEC)
                infos = await queue.wait_done([task_id], timeout=60, poll_interval=0.005)
                assert infos[task_id].status == pb.TASK_STATUS_SUCCEEDED, infos[task_id].error
                phases["total"].append(time.perf_counter() - t0)
                phases["execute"].append(seen[TaskFinished, task_id] - seen[TaskStarted, task_id])
        finally:
            await queue.close()
            engine.shutdown()
            await runner
        return phases

    async def throughput(self, concurrent: int, tasks: int) -> float:
        """Tasks per second for a batch submitted at once."""
        assert self.pool is not None
        engine = self.engine(f"c{concurrent}", concurrent)
        runner = asyncio.create_task(engine.run())
        queue = TaskQueueClient(self.pool.address)
        await queue.login("bench", "bench-password")
        try:
            await queue.wait_done([await queue.submit(SPEC)], timeout=60)  # warm-up
            t0 = time.perf_counter()
            ids = [await queue.submit(SPEC) for _ in range(tasks)]
            infos = await queue.wait_done(ids, timeout=300, poll_interval=0.02)
            elapsed = time.perf_counter() - t0
            assert all(i.status == pb.TASK_STATUS_SUCCEEDED for i in infos.values())
        finally:
            await queue.close()
            engine.shutdown()
            await runner
        return tasks / elapsed


async def measure(n: int, tasks: int) -> tuple[dict[str, list[float]], dict[int, float]]:
    with tempfile.TemporaryDirectory() as tmp:
        bench = Bench(Path(tmp))
        await bench.start()
        try:
            phases = await bench.per_task(n)
            rates = {c: await bench.throughput(c, tasks) for c in (1, 2, 4)}
        finally:
            await bench.stop()
    return phases, rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", type=int, default=20, help="tasks a side for the overhead")
    parser.add_argument("--tasks", type=int, default=16, help="tasks per throughput batch")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    keyring.set_keyring(MemoryKeyring())

    phases, rates = asyncio.run(measure(args.n, args.tasks))
    base_med = statistics.median(phases["baseline"])
    total = statistics.median(phases["total"])
    execute = statistics.median(phases["execute"])
    section = "\n".join(
        [
            "## Docker overhead (`bench/docker_overhead.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {sys.platform}, medians of {args.n}. "
            f"A trivial container task (`true` in `{IMAGE}`) through the reference pool on "
            "loopback and the Docker executor, against `docker run --rm --network none IMAGE "
            "true` from the CLI, the two alternating in the same run.",
            "",
            "| measure | median | vs. `docker run` |",
            "|---|---|---|",
            f"| `docker run --rm` | {base_med * 1000:.0f} ms | 1.00 |",
            f"| executor: task started → finished | {execute * 1000:.0f} ms | "
            f"{execute / base_med:.2f} |",
            f"| worker total: submit → result stored at the pool | {total * 1000:.0f} ms | "
            f"{total / base_med:.2f} |",
            "",
            f"Throughput, {args.tasks} trivial tasks submitted at once:",
            "",
            "| tasks at once | tasks per second |",
            "|---|---|",
            *(f"| {c} | {rate:.2f} |" for c, rate in rates.items()),
            "",
            "The executor's time is container create, start, wait, the result copy "
            "(`get_archive`), the final log read and the inspect; removal happens after the "
            "result is delivered.",
        ]
    )
    print(section)
    if not args.no_write:
        write_section("docker-overhead", section)
        print("\nwritten to docs/benchmarks.md")


if __name__ == "__main__":
    main()
