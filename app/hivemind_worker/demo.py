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
import sys
import tarfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hivemind_worker.config import Settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.errors import HiveMindError
from hivemind_worker.paths import Paths
from hivemind_worker.wiring import login_to_pool, self_command

if TYPE_CHECKING:
    from hivemind_worker.engine.engine import WorkerEngine

log = logging.getLogger(__name__)

DEMO_ACCOUNT = "demo"
# Time for the first use of the ml and data samples: their environments (about 350 MB) are
# downloaded and built before they run.
RUNNER_SAMPLES_SECONDS = 1800.0


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
                 "--lease-timeout", str(self.lease_timeout), "--stop-with-stdin"],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log_file, text=True,
                # Its own process group: a Ctrl-C in the terminal (or a signal to the demo's
                # group) reaches the worker, which finishes its tasks; this stops the pool after.
                # However this process ends, the pipe to the pool's stdin closes and it stops.
                **_own_process_group(),
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


def _own_process_group() -> dict[str, Any]:
    if sys.platform == "win32":
        return {"creationflags": subprocess.CREATE_NEW_PROCESS_GROUP}
    return {"start_new_session": True}


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
        self.extra_wait = 0.0  # seconds beyond the plain samples' to wait for the results

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

    async def submit_runner_samples(self, engine: WorkerEngine) -> list[str]:
        """Submit the scikit-learn and data-processing samples this worker runs; for each
        other one, a line saying why it was left out (never a task nobody takes)."""
        from hivemind_worker.engine.runners import enabled_capabilities
        from hivemind_worker.pool.client import TaskQueueClient
        from hivemind_worker.samples import runner_samples

        executor = engine.executor
        problem = await asyncio.to_thread(executor.runner_problem)
        offered = set() if problem else set(enabled_capabilities(engine.settings))
        skipped: list[str] = []
        chosen = []
        for sample in runner_samples():
            if sample.needs in offered:
                chosen.append(sample)
            elif problem:
                skipped.append(f"{sample.name}: skipped, {problem}")
            else:
                skipped.append(f"{sample.name}: skipped, {sample.needs} tasks are off in the "
                               "settings")  # fmt: skip
        if not chosen:
            return skipped
        queue = TaskQueueClient(self.pool.address)
        try:
            await queue.login(DEMO_ACCOUNT, self.password)
            for sample in chosen:
                self.submitted[await queue.submit(sample.spec)] = sample.name
        finally:
            await queue.close()
        self.extra_wait = RUNNER_SAMPLES_SECONDS
        return skipped

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
