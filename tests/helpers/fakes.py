"""Fake collaborators for the engine (docker-py's make_fake_client style): a pool client and an
executor that live in the test's process, so the engine's delivery paths that real services
seldom reach can be driven on purpose. They stand in for the network and the sandbox only; the
engine, its delivery and its outbox (a real SQLite file) are the real ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from hivemind_worker.config import Settings, load_settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.engine.engine import WorkerEngine
from hivemind_worker.engine.executors.base import Executor, LogSink, Usage
from hivemind_worker.engine.monitor import HostSample
from hivemind_worker.engine.pool_client import (
    HeartbeatReply,
    NodeStatus,
    Offer,
    PoolTerms,
    RefusedSpec,
    Registration,
    RunningLease,
)
from hivemind_worker.paths import default_paths
from hivemind_worker.tasks import Resources, TaskKind, TaskResult, TaskSpec, TaskStatus

ADDRESS = "127.0.0.1:1"


def spec(task_id: str, lease_id: str = "", **fields: object) -> TaskSpec:
    """A valid python task spec with a lease; fields override the defaults."""
    values: dict[str, object] = {
        "task_id": task_id,
        "lease_id": lease_id or f"lease-{task_id}",
        "kind": TaskKind.PYTHON,
        "source": "print('hi')",
        "resources": Resources(cpus=0.5, memory_bytes=64 << 20, disk_bytes=16 << 20),
        "timeout_seconds": 60,
    }
    values.update(fields)
    return TaskSpec(**values)  # type: ignore[arg-type]


@dataclass
class FakePool:
    """What a pool would hold: the tasks to hand out, and every report and upload received."""

    handouts: asyncio.Queue[list[TaskSpec | RefusedSpec]] = field(default_factory=asyncio.Queue)
    reports: list[TaskResult] = field(default_factory=list)
    uploads: list[tuple[str, str]] = field(default_factory=list)
    offers: list[Offer] = field(default_factory=list)
    heartbeats: list[tuple[NodeStatus, list[RunningLease]]] = field(default_factory=list)
    # Raised by report() in turn, one per call, before reports are accepted.
    report_errors: list[BaseException] = field(default_factory=list)
    cancel_next_heartbeat: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def hand_out(self, *specs: TaskSpec | RefusedSpec) -> None:
        self.handouts.put_nowait(list(specs))

    def reports_for(self, lease_id: str) -> list[TaskResult]:
        return [r for r in self.reports if r.lease_id == lease_id]

    def client(self, settings: Settings, *, token: str = "", **_: object) -> FakePoolClient:
        return FakePoolClient(self, settings.node_pool_address)


class FakePoolClient:
    """The engine's pool client, answering from a FakePool instead of the network."""

    def __init__(self, pool: FakePool, address: str) -> None:
        self.pool = pool
        self.address = address

    async def close(self) -> None:
        return None

    async def register(self, node: Registration) -> PoolTerms:
        return PoolTerms(heartbeat_interval=0.2, lease_timeout=30, max_wait=1)

    async def heartbeat(
        self,
        node_id: str,
        status: NodeStatus,
        host: HostSample,
        running: list[RunningLease],
        status_message: str = "",
    ) -> HeartbeatReply:
        self.pool.heartbeats.append((status, list(running)))
        cancel, self.pool.cancel_next_heartbeat = tuple(self.pool.cancel_next_heartbeat), []
        return HeartbeatReply(cancel_task_ids=cancel)

    async def get_tasks(self, node_id: str, offer: Offer) -> list[TaskSpec | RefusedSpec]:
        self.pool.offers.append(offer)
        try:
            return await asyncio.wait_for(self.pool.handouts.get(), offer.wait_seconds)
        except TimeoutError:
            return []

    async def upload(self, node_id: str, result: TaskResult) -> None:
        if result.archive is not None:
            self.pool.uploads.append((result.task_id, result.lease_id))

    async def report(self, node_id: str, result: TaskResult) -> None:
        if self.pool.report_errors:
            raise self.pool.report_errors.pop(0)
        self.pool.reports.append(
            TaskResult(result.task_id, result.lease_id, result.status, error=result.error)
        )
        self.pool.changed.set()


class FakeExecutor(Executor):
    """Runs nothing: each task 'runs' until the test releases it (or at once), then succeeds."""

    capability = "process"

    def __init__(self, *, hold: bool = False) -> None:
        self.hold = hold
        self.started: list[tuple[str, str]] = []
        self.release: dict[str, asyncio.Event] = {}
        self.cancelled: set[str] = set()
        self._prepared: dict[str, Path] = {}

    async def prepare(self, task: TaskSpec) -> None:
        self._prepared[task.task_id] = Path("/nonexistent") / task.task_id
        self.release[task.task_id] = asyncio.Event()
        if not self.hold:
            self.release[task.task_id].set()

    async def _run(
        self, task: TaskSpec, on_log: LogSink | None, workspace: Path, result: TaskResult
    ) -> None:
        self.started.append((task.task_id, task.lease_id))
        await self.release[task.task_id].wait()
        if task.task_id in self.cancelled:
            result.status = TaskStatus.CANCELLED
            result.error = "cancelled"
        else:
            result.status = TaskStatus.SUCCEEDED

    def workspace(self, task_id: str) -> Path | None:
        return self._prepared.get(task_id)

    def cancel_requested(self, task_id: str) -> bool:
        return task_id in self.cancelled

    async def cancel(self, task_id: str) -> None:
        self.cancelled.add(task_id)
        if task_id in self.release:
            self.release[task_id].set()

    async def pause(self) -> None:
        return None

    async def resume(self) -> None:
        return None

    async def cleanup(self, task_id: str) -> None:
        self._prepared.pop(task_id, None)

    def usage(self) -> dict[str, Usage]:
        return {}


@dataclass
class FakeWorld:
    engine: WorkerEngine
    pool: FakePool
    executor: FakeExecutor
    events: list[object]
    runner: asyncio.Task[None]

    async def wait_until(self, condition: Callable[[], bool], what: str, timeout: float = 10):  # type: ignore[no-untyped-def]
        """Poll a condition on the loop; a clear failure naming what did not happen."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not condition():
            if loop.time() > deadline:
                raise AssertionError(f"timed out waiting for {what}")
            await asyncio.sleep(0.02)

    async def stop(self) -> None:
        self.engine.shutdown()
        await asyncio.wait_for(self.runner, 10)


@contextlib.contextmanager
def fake_settings(home: Path, **overrides: object) -> Iterator[tuple[Settings, CredentialStore]]:
    paths = default_paths(home)
    paths.ensure()
    values: dict[str, object] = {
        "node_pool_address": ADDRESS,
        "account": "alice",
        "node_id": "fake-node",
        "max_cpu_cores": 2,
        "max_memory_gb": 1,
        "max_concurrent_tasks": 4,
    }
    values.update(overrides)
    settings = load_settings(paths, env={}, overrides=values)
    credentials = CredentialStore(paths)
    credentials.set_token(ADDRESS, "alice", "fake-token")
    yield settings, credentials


async def start_fake_world(
    home: Path, *, pool: FakePool | None = None, hold: bool = False, **overrides: object
) -> FakeWorld:
    """A real engine on this loop, between a fake pool and a fake executor."""
    pool = pool or FakePool()
    executor = FakeExecutor(hold=hold)
    with fake_settings(home, **overrides) as (settings, credentials):
        engine = WorkerEngine(
            settings,
            node_id=settings.node_id,
            credentials=credentials,
            executor=executor,
            outbox_dir=default_paths(home).outbox_dir,
            client_factory=pool.client,
        )
    events: list[object] = []
    engine.subscribe(events.append)
    runner = asyncio.create_task(engine.run())
    return FakeWorld(engine, pool, executor, events, runner)
