"""The demo, Qt-free: a local reference pool in its own process, fed with sample tasks.

The CLI's `demo` and the desktop app's demo both use `DemoPool`; the pool runs in a child
process (DESIGN.md: one grpc.aio loop per process), as a real, remote pool would.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import io
import logging
import secrets
import subprocess
import tarfile
import time
from pathlib import Path

from hivemind_worker.config import Settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.errors import HiveMindError
from hivemind_worker.paths import Paths
from hivemind_worker.wiring import login_to_pool, self_command

log = logging.getLogger(__name__)

DEMO_ACCOUNT = "demo"


class DemoError(HiveMindError):
    """The local pool could not be set up."""

    title = "Demo pool failed"


class LocalPool:
    """A reference pool in its own process, on a loopback port of its choosing."""

    def __init__(self, db: Path, *, heartbeat_interval: int = 2, lease_timeout: int = 30) -> None:
        self.db = db
        self.log = db.with_suffix(".log")
        self.heartbeat_interval = heartbeat_interval
        self.lease_timeout = lease_timeout
        self.process: subprocess.Popen[str] | None = None
        self.address = ""

    def add_user(self, name: str, password: str) -> None:
        done = subprocess.run(
            [*self_command(), "pool", "add-user", name, "--db", str(self.db), "--password-stdin"],
            input=password + "\n", capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        if done.returncode != 0:
            raise DemoError(
                "Could not create the demo account.", details=done.stderr.strip()[-2000:]
            )

    def start(self, timeout: float = 30.0) -> str:
        with self.log.open("a") as log_file:  # the child keeps its own copy of the handle
            self.process = subprocess.Popen(
                [*self_command(), "pool", "serve", "--db", str(self.db),
                 "--listen", "127.0.0.1:0",
                 "--heartbeat-interval", str(self.heartbeat_interval),
                 "--lease-timeout", str(self.lease_timeout)],
                stdout=subprocess.PIPE, stderr=log_file, text=True,
            )  # fmt: skip
        assert self.process.stdout is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.process.stdout.readline()
            if not line:
                break
            if line.startswith("listening on "):
                self.address = line.split()[-1]
                return self.address
        self.stop()
        raise DemoError(f"The local pool did not start; see {self.log}.")

    def stop(self) -> None:
        if self.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(10)
        self.process = None


def fresh_demo_db(paths: Paths) -> Path:
    """The demo pool's database path, emptied: every demo starts from an empty pool."""
    demo_dir = paths.data_dir / "demo"
    demo_dir.mkdir(parents=True, exist_ok=True)
    db = demo_dir / "pool.db"
    for suffix in ("", "-wal", "-shm"):
        Path(f"{db}{suffix}").unlink(missing_ok=True)
    return db


class DemoPool:
    """A local pool with a demo account and sample tasks submitted; async, off the GUI thread."""

    def __init__(self, paths: Paths, tasks: int) -> None:
        self.pool = LocalPool(fresh_demo_db(paths))
        self.tasks = tasks
        self.password = secrets.token_urlsafe(16)
        self.submitted: dict[str, str] = {}  # task id -> sample name

    async def start(self, settings: Settings, credentials: CredentialStore) -> Settings:
        """Start the pool, log in as `demo`, submit the sample tasks; the settings to use."""
        from hivemind_worker.pool.client import TaskQueueClient
        from hivemind_worker.samples import demo_tasks

        await asyncio.to_thread(self.pool.add_user, DEMO_ACCOUNT, self.password)
        address = await asyncio.to_thread(self.pool.start)
        log.info("demo pool at %s (log %s)", address, self.pool.log)
        settings = dataclasses.replace(settings, node_pool_address=address, account=DEMO_ACCOUNT)
        await login_to_pool(settings, credentials, DEMO_ACCOUNT, self.password)
        queue = TaskQueueClient(address)
        try:
            await queue.login(DEMO_ACCOUNT, self.password)
            for sample in demo_tasks(self.tasks):
                self.submitted[await queue.submit(sample.spec)] = sample.name
        finally:
            await queue.close()
        return settings

    async def stop(self) -> None:
        await asyncio.to_thread(self.pool.stop)


def result_summary(archive: bytes) -> str:
    """The summary.txt a sample task writes, or the archive's size."""
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.name.endswith("summary.txt") and member.isfile():
                fh = tar.extractfile(member)
                if fh is not None:
                    return fh.read().decode("utf-8", "replace").strip()
    return f"({len(archive)} bytes of results)"
