"""GUI test helpers: a worker home with a real engine, and the real pool on the engine's loop."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from helpers.harness import (
    USER,
    login_token,
    python_task,
    queue_client,
    start_pool,
    worker_settings,
)
from hivemind_worker.config import Settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.engine.engine import WorkerEngine
from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.engine.runners.environments import Environments
from hivemind_worker.paths import Paths
from hivemind_worker.pool.server import PoolServer
from hivemind_worker.protocol import nodepool_pb2 as pb

if TYPE_CHECKING:
    from hivemind_worker.gui.app import WorkerApp


@dataclass
class World:
    """One worker home: settings, paths, credentials, a process-sandbox engine."""

    settings: Settings
    paths: Paths
    credentials: CredentialStore
    engine: WorkerEngine
    pool: PoolServer | None = None
    task_ids: list[str] = field(default_factory=list)


def make_world(
    home: Path,
    address: str = "127.0.0.1:1",
    environments: Environments | None = None,
    **overrides: object,
) -> World:
    """With `environments`, the engine runs (and advertises) the ml and data runners."""
    settings, paths = worker_settings(home, address, **overrides)
    credentials = CredentialStore(paths)
    engine = WorkerEngine(
        settings,
        node_id=settings.node_id,
        credentials=credentials,
        executor=ProcessExecutor(settings.work_dir, environments=environments),
        outbox_dir=paths.outbox_dir,
    )
    return World(settings, paths, credentials, engine)


class LoopPool:
    """The reference pool on the engine thread's loop (DESIGN.md: one grpc.aio loop per process)."""

    def __init__(self, world: World, db: Path, tasks: list[pb.TaskSpec]) -> None:
        self.world = world
        self.db = db
        self.tasks = tasks
        self.app: WorkerApp | None = None

    async def before(self) -> None:
        world = self.world
        world.pool = await start_pool(self.db)
        address = world.pool.address
        token = await login_token(address)
        await asyncio.to_thread(world.credentials.set_token, address, USER, token)
        settings = dataclasses.replace(world.settings, node_pool_address=address)
        world.settings = settings
        if self.app is not None:
            self.app.set_settings_from_loop(settings)
        else:
            world.engine.apply_settings(settings)
        await self.submit(self.tasks)

    async def submit(self, tasks: list[pb.TaskSpec]) -> list[str]:
        assert self.world.pool is not None
        async with queue_client(self.world.pool.address) as queue:
            ids = [await queue.submit(spec) for spec in tasks]
        self.world.task_ids.extend(ids)
        return ids

    async def task_info(self, task_id: str) -> pb.TaskInfo:
        assert self.world.pool is not None
        async with queue_client(self.world.pool.address) as queue:
            return await queue.get(task_id)

    async def after(self) -> None:
        if self.world.pool is not None:
            await self.world.pool.stop()


def busy_task(seconds: float, megabytes: int = 40, *, cpu: bool = False) -> pb.TaskSpec:
    """Burns CPU and holds memory for a while, so charts and tables have something to show:
    `seconds` of wall time, or (`cpu`) of its own CPU time, however loaded the machine is."""
    return python_task(
        """
        import sys, time
        hold = bytearray(int(sys.argv[2]) * 1024 * 1024)
        for i in range(0, len(hold), 4096):
            hold[i] = 1  # touch every page so it counts as used memory
        clock = time.process_time if sys.argv[3] == "cpu" else time.time
        end = clock() + float(sys.argv[1])
        n = 0
        while clock() < end:
            n += 1
        open("results/summary.txt", "w").write(f"{n} loops\\n")
        """,
        str(seconds),
        str(megabytes),
        "cpu" if cpu else "wall",
    )
