"""Test harness: a real reference pool on 127.0.0.1:0 and real engines, on the test's event loop."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import os
import subprocess
import sys
import tarfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from hivemind_worker.config import Settings, load_settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.engine.engine import WorkerEngine
from hivemind_worker.engine.events import Event, StateChanged
from hivemind_worker.engine.executors.base import Executor
from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.engine.probes import Probes
from hivemind_worker.paths import Paths, default_paths
from hivemind_worker.pool.client import TaskQueueClient
from hivemind_worker.pool.server import PoolConfig, PoolServer
from hivemind_worker.pool.store import PoolStore
from hivemind_worker.protocol import nodepool_pb2 as pb

ROOT = Path(__file__).resolve().parents[2]
USER = "alice"
PASSWORD = "correct horse battery staple"


async def start_pool(db: Path, *, listen: str = "127.0.0.1:0", **config: object) -> PoolServer:
    """A pool with user alice; short lease timings unless the test says otherwise."""
    store = PoolStore(db)
    if store.password_hash(USER) is None:  # add_user on a restart would revoke tokens
        store.add_user(USER, PASSWORD)
    store.close()
    options: dict[str, object] = {
        "heartbeat_interval": 1,
        "lease_timeout": 10,
        "max_wait": 20,
        "reaper_interval": 0.2,
    }
    options.update(config)
    server = PoolServer(PoolConfig(db_path=db, listen=listen, **options))  # type: ignore[arg-type]
    await server.start()
    return server


@dataclass
class Worker:
    engine: WorkerEngine
    paths: Paths
    events: list[Event] = field(default_factory=list)
    runner: asyncio.Task[None] | None = None

    def states(self) -> list[str]:
        return [e.state.value for e in self.events if isinstance(e, StateChanged)]

    async def stop(self) -> None:
        self.engine.shutdown()
        if self.runner is not None:
            await asyncio.wait_for(self.runner, 30)


async def login_token(address: str) -> str:
    from hivemind_worker.engine.pool_client import NodePoolClient

    client = NodePoolClient(address)
    try:
        return await client.login(USER, PASSWORD)
    finally:
        await client.close()


def worker_settings(home: Path, address: str, **overrides: object) -> tuple[Settings, Paths]:
    paths = default_paths(home)
    paths.ensure()
    values: dict[str, object] = {
        "node_pool_address": address,
        "account": USER,
        "max_concurrent_tasks": 4,
        "max_cpu_cores": 2,
        "max_memory_gb": 4,
        "node_id": home.name,
    }
    values.update(overrides)
    return load_settings(paths, env={}, overrides=values), paths


async def start_worker(
    home: Path,
    address: str,
    *,
    token: str | None = None,
    executor: Callable[[Settings], Executor] | None = None,
    probes: Probes | None = None,
    choose_executor_at_start: bool = False,
    **overrides: object,
) -> Worker:
    """An engine, logged in through the (in-memory) keyring; the process executor unless
    `executor` makes another from the worker's settings (when the engine starts, on its own
    thread, with `choose_executor_at_start`, as the desktop app has it)."""
    settings, paths = worker_settings(home, address, **overrides)
    credentials = CredentialStore(paths)
    credentials.set_token(address, USER, token if token is not None else await login_token(address))

    def make() -> Executor:
        return executor(settings) if executor else ProcessExecutor(settings.work_dir)

    engine = WorkerEngine(
        settings,
        node_id=settings.node_id,
        credentials=credentials,
        executor=make if choose_executor_at_start else make(),
        outbox_dir=paths.outbox_dir,
        probes=probes,
    )
    worker = Worker(engine, paths)
    engine.subscribe(worker.events.append)
    worker.runner = asyncio.create_task(engine.run())
    return worker


@contextlib.asynccontextmanager
async def queue_client(address: str) -> AsyncIterator[TaskQueueClient]:
    client = TaskQueueClient(address)
    await client.login(USER, PASSWORD)
    try:
        yield client
    finally:
        await client.close()


def python_task(source: str, *argv: str, **fields: object) -> pb.TaskSpec:
    values: dict[str, object] = {
        "resources": pb.Resources(cpus=0.5, memory_bytes=256 << 20, disk_bytes=64 << 20),
        "timeout_seconds": 120,
    }
    values.update(fields)
    return pb.TaskSpec(
        kind=pb.TASK_KIND_PYTHON,
        source=textwrap.dedent(source).lstrip(),
        argv=list(argv),
        **values,  # type: ignore[arg-type]
    )


async def wait_for(predicate: Callable[[], bool], timeout: float = 30.0, what: str = "") -> None:
    """Poll a condition every 50 ms; a hang guard, not a timing assertion."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.05)


def archive_files(archive: bytes) -> dict[str, bytes]:
    """Regular files of a result archive, by name."""
    files: dict[str, bytes] = {}
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        for member in tar.getmembers():
            if member.isfile():
                fh = tar.extractfile(member)
                assert fh is not None
                files[member.name] = fh.read()
    return files


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def worker_subprocess(
    home: Path, address: str, *extra: str, env_overrides: dict[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """`hivemind-worker run --headless` as its own process, logged in with `login`.

    Async because the pool answering `login` runs on the caller's event loop.
    """
    # The process sandbox: these tests are about the protocol, and with Docker present the
    # worker would try to pull its Python image from a registry (no traffic may leave here).
    env = {
        **os.environ,
        "HIVEMIND_HOME": str(home),
        "PYTHONUNBUFFERED": "1",
        "DOCKER_ENABLED": "false",
        **(env_overrides or {}),
    }
    env.pop("NODE_ID", None)
    base = [sys.executable, "-m", "hivemind_worker"]
    login = await asyncio.create_subprocess_exec(
        *base, "login", "--node-pool", address, "--account", USER, "--password-stdin",
        env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(login.communicate((PASSWORD + "\n").encode()), 60)
    assert login.returncode == 0, out.decode()
    log = (home / "stderr.log").open("wb")
    return subprocess.Popen(  # noqa: ASYNC220 - killed by pid with SIGKILL in the test
        [*base, "run", "--headless", "--node-pool", address, "--node-id", home.name, *extra],
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )


# Each batch task derives its payload from its index and an input file, so every result is
# distinct and checkable byte for byte.
BATCH_SOURCE = """
    import hashlib, sys
    index = int(sys.argv[1])
    seed = open("input/seed.bin", "rb").read()
    payload = b"".join(
        hashlib.sha256(seed + bytes([index % 256, i % 256])).digest()
        for i in range(index * 40 + 1)
    )
    with open("results/payload.bin", "wb") as fh:
        fh.write(payload)
    print(f"task {index}: {len(payload)} bytes")
"""


def expected_payload(index: int, seed: bytes) -> bytes:
    return b"".join(
        hashlib.sha256(seed + bytes([index % 256, i % 256])).digest() for i in range(index * 40 + 1)
    )


async def run_checked_batch(
    queue: TaskQueueClient, node_id: str, *, count: int, timeout: float
) -> None:
    """Submit `count` batch tasks; each must succeed on `node_id` with its exact payload."""
    ids = []
    for index in range(count):
        seed = f"seed-{index}".encode()
        spec = python_task(
            BATCH_SOURCE,
            str(index),
            name=f"batch {index}",
            input_files=[pb.InputFile(path="input/seed.bin", content=seed)],
        )
        ids.append((index, seed, await queue.submit(spec)))
    infos = await queue.wait_done([i for _, _, i in ids], timeout=timeout)
    for index, seed, task_id in ids:
        info = infos[task_id]
        assert info.status == pb.TASK_STATUS_SUCCEEDED, (index, info.error)
        assert info.node_id == node_id
        files = archive_files(await queue.download(task_id))
        assert files["results/payload.bin"] == expected_payload(index, seed)
        assert f"task {index}:".encode() in info.log_tail
