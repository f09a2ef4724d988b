"""The benchmarks' common set-up: a reference pool on loopback with one user, and a worker
engine logged in to it, running on this loop; torn down in the right order."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind_worker.config import Settings, load_settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.engine.engine import WorkerEngine
from hivemind_worker.engine.events import Event
from hivemind_worker.engine.executors.base import Executor
from hivemind_worker.engine.pool_client import NodePoolClient
from hivemind_worker.paths import default_paths
from hivemind_worker.pool.client import TaskQueueClient
from hivemind_worker.pool.server import PoolConfig, PoolServer
from hivemind_worker.pool.store import PoolStore

USER, PASSWORD, NODE = "bench", "bench-password", "bench"


@dataclass
class BenchWorker:
    pool: PoolServer
    engine: WorkerEngine
    queue: TaskQueueClient  # logged in as the bench user, for submitting and waiting
    settings: Settings


@contextlib.asynccontextmanager
async def bench_worker(
    home: Path,
    make_executor: Callable[[Settings], Executor],
    *,
    pool_options: dict[str, Any] | None = None,
    engine_options: dict[str, Any] | None = None,
    on_event: Callable[[Event], None] | None = None,
    **settings: object,
) -> AsyncIterator[BenchWorker]:
    """A pool (heartbeat 5 s, long-poll 30 s unless `pool_options` say otherwise) and a worker
    on it with `settings` over the defaults; `engine_options` (e.g. probes) go to the engine,
    `on_event` sees every event from the engine's start.
    Needs an in-memory keyring set (bench/_report.py's MemoryKeyring)."""
    db = home / "pool.db"
    store = PoolStore(db)
    store.add_user(USER, PASSWORD)
    store.close()
    options: dict[str, Any] = {"heartbeat_interval": 5, "max_wait": 30, **(pool_options or {})}
    pool = PoolServer(PoolConfig(db_path=db, listen="127.0.0.1:0", **options))
    await pool.start()
    try:
        paths = default_paths(home / "worker")
        paths.ensure()
        config = load_settings(
            paths,
            env={},
            overrides={
                "node_pool_address": pool.address, "account": USER, "node_id": NODE, **settings,
            },
        )  # fmt: skip
        client = NodePoolClient(pool.address)
        token = await client.login(USER, PASSWORD)
        await client.close()
        credentials = CredentialStore(paths)
        credentials.set_token(pool.address, USER, token)
        engine = WorkerEngine(
            config,
            node_id=NODE,
            credentials=credentials,
            executor=make_executor(config),
            outbox_dir=paths.outbox_dir,
            **(engine_options or {}),
        )
        if on_event is not None:
            engine.subscribe(on_event)
        runner = asyncio.create_task(engine.run())
        queue = TaskQueueClient(pool.address)
        try:
            await queue.login(USER, PASSWORD)
            yield BenchWorker(pool, engine, queue, config)
        finally:
            await queue.close()
            engine.shutdown()
            await runner
    finally:
        await pool.stop()
