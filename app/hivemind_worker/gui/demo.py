"""The desktop demo: a local reference pool in its own process, fed with sample tasks."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import secrets
from pathlib import Path

from hivemind_worker.config import Settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.paths import Paths

log = logging.getLogger(__name__)


class DemoPool:
    """Runs on the engine's loop (EngineThread's `before`/`after` hooks), never the GUI thread."""

    def __init__(self, paths: Paths, tasks: int) -> None:
        from hivemind_worker.cli import LocalPool

        demo_dir = paths.data_dir / "demo"
        demo_dir.mkdir(parents=True, exist_ok=True)
        db = demo_dir / "pool.db"
        for suffix in ("", "-wal", "-shm"):  # every demo starts from an empty pool
            Path(f"{db}{suffix}").unlink(missing_ok=True)
        self.pool = LocalPool(db)
        self.tasks = tasks
        self.password = secrets.token_urlsafe(16)

    async def start(self, settings: Settings, credentials: CredentialStore) -> Settings:
        """Start the pool, log in as `demo`, submit the sample tasks; the settings to use."""
        from hivemind_worker.cli import login_to_pool
        from hivemind_worker.pool.client import TaskQueueClient
        from hivemind_worker.samples import demo_tasks

        await asyncio.to_thread(self.pool.add_user, "demo", self.password)
        address = await asyncio.to_thread(self.pool.start)
        log.info("demo pool at %s (log %s)", address, self.pool.log)
        settings = dataclasses.replace(settings, node_pool_address=address, account="demo")
        await login_to_pool(settings, credentials, "demo", self.password)
        queue = TaskQueueClient(address)
        try:
            await queue.login("demo", self.password)
            for sample in demo_tasks(self.tasks):
                await queue.submit(sample.spec)
        finally:
            await queue.close()
        return settings

    async def stop(self) -> None:
        await asyncio.to_thread(self.pool.stop)
