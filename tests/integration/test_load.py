"""Load with faults: 200 short tasks, 4 worker processes killed at random; each done once."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest

from helpers.harness import archive_files, python_task, queue_client, start_pool, worker_subprocess
from hivemind_worker.protocol import nodepool_pb2 as pb

pytestmark = [pytest.mark.slow, pytest.mark.timeout(420)]

TASKS = 200
WORKERS = 4
KILLS = 6


async def test_every_task_is_done_exactly_once_through_random_worker_kills(
    tmp_path: Path,
) -> None:
    rng = random.Random(1234)  # reproducible kill schedule
    pool = await start_pool(tmp_path / "pool.db", lease_timeout=3, heartbeat_interval=1)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for n in range(WORKERS):
            name = f"node-{n}"
            procs[name] = await worker_subprocess(
                tmp_path / name, pool.address, "--max-concurrent-tasks", "2"
            )
        async with queue_client(pool.address) as queue:
            ids = []
            for i in range(TASKS):
                source = (
                    "import sys, time\n"
                    "time.sleep(0.05)\n"
                    "open('results/out.txt', 'w').write(sys.argv[1])\n"
                )
                spec = python_task(source, str(i), max_attempts=20, name=f"load {i}")
                ids.append(await queue.submit(spec))

            async def killer() -> None:
                for _ in range(KILLS):  # bounded: a fixed number of kills, then let it finish
                    await asyncio.sleep(rng.uniform(0.5, 2.0))
                    name = rng.choice(sorted(procs))
                    os.kill(procs[name].pid, signal.SIGKILL)
                    await asyncio.to_thread(procs[name].wait, 10)
                    procs[name] = await worker_subprocess(
                        tmp_path / name, pool.address, "--max-concurrent-tasks", "2"
                    )

            kills = asyncio.create_task(killer())
            infos = await queue.wait_done(ids, timeout=360)
            await kills
            for i, task_id in enumerate(ids):
                info = infos[task_id]
                assert info.status == pb.TASK_STATUS_SUCCEEDED, (i, info.error)
            for i in rng.sample(range(TASKS), 20):  # results belong to their own task
                files = archive_files(await queue.download(ids[i]))
                assert files["results/out.txt"] == str(i).encode()
        db = sqlite3.connect(f"file:{tmp_path / 'pool.db'}?mode=ro", uri=True)
        try:
            rows = db.execute(
                "SELECT task_id, COUNT(*) FROM reports WHERE status = 'succeeded' GROUP BY task_id"
            ).fetchall()
        finally:
            db.close()
        counts = dict(rows)
        assert sorted(counts) == sorted(ids)
        assert set(counts.values()) == {1}  # one accepted success per task: none lost, none twice
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
        await pool.stop()
