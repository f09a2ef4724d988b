"""`hivemind-worker doctor`: pool reachable, login valid, Docker there, sandbox walls, room?"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

import grpc
import grpc.aio
import psutil

from hivemind_worker.config import Settings
from hivemind_worker.credentials import CredentialError, CredentialStore
from hivemind_worker.paths import Paths

GiB = 1024**3


@dataclass(frozen=True)
class Check:
    name: str
    level: str  # "ok", "warn" or "fail"
    detail: str

    @property
    def mark(self) -> str:
        return {"ok": "ok  ", "warn": "warn", "fail": "FAIL"}[self.level]


async def _pool_checks(settings: Settings, credentials: CredentialStore) -> list[Check]:
    from hivemind_worker.engine.pool_client import PoolError, client_for
    from hivemind_worker.protocol import nodepool_pb2 as pb
    from hivemind_worker.protocol import nodepool_pb2_grpc as pb_grpc

    address = settings.node_pool_address
    client = client_for(settings, timeout=5.0)
    checks: list[Check] = []
    try:
        try:
            pong = await client.ping()
        except PoolError as exc:
            return [
                Check("pool", "fail", exc.message),
                Check("login", "fail", "not checked: the pool is unreachable"),
            ]
        checks.append(Check("pool", "ok", f"{address} answers (pool {pong})"))
        try:
            last: str | None = await asyncio.to_thread(credentials.last_account, address)
            account = settings.account or last or ""
            token = (
                await asyncio.to_thread(credentials.get_token, address, account)
                if account
                else None
            )
        except CredentialError as exc:
            return [*checks, Check("login", "fail", f"keyring: {exc}")]
        if not token:
            return [*checks, Check("login", "fail", "not logged in: run `hivemind-worker login`")]
        # ListTasks is the cheapest call that needs a valid token and changes nothing.
        stub = pb_grpc.TaskQueueStub(client._channel)
        try:
            await stub.ListTasks(
                pb.ListTasksRequest(limit=1),
                timeout=5.0,
                metadata=(("authorization", f"Bearer {token}"),),
            )
        except grpc.aio.AioRpcError as exc:
            if exc.code() is grpc.StatusCode.UNAUTHENTICATED:
                return [
                    *checks,
                    Check("login", "fail", f"{exc.details()}: run `hivemind-worker login`"),
                ]
            return [*checks, Check("login", "warn", f"could not verify: {exc.details()}")]
        checks.append(Check("login", "ok", f"logged in as {account} ({credentials.backend_name})"))
        return checks
    finally:
        await client.close()


def _docker_check(settings: Settings) -> Check:
    if not settings.docker_enabled:
        return Check("docker", "warn", "disabled in settings: tasks run in the process sandbox")
    try:
        import docker
        import docker.errors

        client = docker.from_env(timeout=5)
        try:
            version = client.version()
            info = client.info()
            try:
                client.images.get(settings.docker_python_image)
                python_image = "present"
            except docker.errors.ImageNotFound:
                python_image = "not pulled yet"
        finally:
            client.close()
    except Exception as exc:  # docker-py raises DockerException, requests and OS errors alike
        return Check(
            "docker",
            "warn",
            f"not reachable ({type(exc).__name__}: {str(exc)[:160]}); tasks run in the process "
            "sandbox. To use Docker: install it (Linux: the docker.io package; Windows: Docker "
            "Desktop), start it, and on Linux add yourself to the 'docker' group.",
        )
    free = ""
    root = info.get("DockerRootDir", "")
    if root:
        with contextlib.suppress(OSError):  # a remote engine or Docker Desktop's VM path
            free = f", {psutil.disk_usage(root).free / GiB:.1f} GiB free in {root}"
    never = settings.docker_pull_policy == "never" and python_image != "present"
    return Check(
        "docker",
        "warn" if never else "ok",
        f"engine {version.get('Version', '?')}, storage driver {info.get('Driver', '?')}, "
        f"cgroup v{info.get('CgroupVersion', '1')} ({info.get('CgroupDriver', '?')}){free}; "
        f"python image {settings.docker_python_image} {python_image}"
        + (" and the pull policy is 'never': python tasks will fail" if never else ""),
    )


def _sandbox_checks() -> list[Check]:
    """One line per wall of the process sandbox, as a real launch on this machine built it."""
    import os
    import sys

    if sys.platform == "win32":
        from hivemind_worker.engine.executors import windows_job

        return [Check(f"sandbox: {name}", "ok" if ok else "warn", text)
                for name, ok, text in windows_job.describe()]  # fmt: skip
    if not sys.platform.startswith("linux"):
        return [Check("sandbox", "warn", f"{sys.platform}: rlimits only, no isolation")]
    from hivemind_worker.engine.executors import cgroups, sandbox_linux
    from hivemind_worker.engine.executors.base import ExecutorError
    from hivemind_worker.engine.executors.process_run import default_python

    try:
        confinement = sandbox_linux.probe(default_python())
    except ExecutorError as exc:
        return [Check("sandbox", "fail", str(exc))]
    checks = [
        Check(f"sandbox: {name}", "ok" if ok else ("fail" if name == "namespaces" else "warn"),
              text)
        for name, ok, text in confinement.lines()
    ]  # fmt: skip
    limits = cgroups.probe()
    checks.append(Check("sandbox: cgroup", "ok" if limits.kind else "warn", limits.reason))
    if os.geteuid() == 0:
        checks.append(
            Check(
                "sandbox: user",
                "warn",
                "the worker runs as root (tasks run as nobody); run it as an ordinary user",
            )
        )
    return checks


def _resource_checks(settings: Settings) -> list[Check]:
    checks = [
        Check("cpu", "ok", f"cap {settings.cpu_cap():g} of {psutil.cpu_count() or 1} cores"),
    ]
    mem = psutil.virtual_memory()
    checks.append(
        Check(
            "memory",
            "ok" if settings.memory_cap_bytes() <= mem.available else "warn",
            f"cap {settings.memory_cap_bytes() / GiB:.1f} GiB; "
            f"{mem.available / GiB:.1f} of {mem.total / GiB:.1f} GiB available now",
        )
    )
    work = settings.work_dir
    probe = work
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    disk = psutil.disk_usage(str(probe))
    if disk.free < 1 * GiB:
        level = "fail"
    elif disk.free < settings.disk_cap_bytes():
        level = "warn"
    else:
        level = "ok"
    checks.append(
        Check(
            "disk",
            level,
            f"cap {settings.disk_cap_bytes() / GiB:.1f} GiB; {disk.free / GiB:.1f} GiB free "
            f"at {work}",
        )
    )
    return checks


async def run_checks(settings: Settings, paths: Paths, credentials: CredentialStore) -> list[Check]:
    pool = await _pool_checks(settings, credentials)
    docker = await asyncio.to_thread(_docker_check, settings)
    resources = await asyncio.to_thread(_resource_checks, settings)
    sandbox = await asyncio.to_thread(_sandbox_checks)
    return [*pool, docker, *sandbox, *resources]
