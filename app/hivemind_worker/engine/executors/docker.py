"""DockerExecutor: tasks in locked-down containers through the Docker engine's API.

One container's lifecycle lives here; around it: images (images.py), following a started
container (follow.py), warm sandboxes (warm.py), kept specs and the leftover sweep
(leftovers.py), the host's Docker (docker_host.py). Still over the ~600-line mark: the
supervision of a running container (_supervise, the disk watch, the timeout) is the next piece
to move out.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import time
from collections.abc import Iterable
from pathlib import Path, PurePosixPath
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container
from docker.types import LogConfig, Mount

from hivemind_worker.engine.executors.base import (
    Executor,
    ExecutorError,
    LogSink,
    Usage,
    collect_results,
    settle_status,
)
from hivemind_worker.engine.executors.docker_host import (
    NOBODY,
    connect,
    courtesy_cgroup_parent,
    hand_over,
    worker_user,
)
from hivemind_worker.engine.executors.follow import (
    SAMPLE_INTERVAL,
    ContainerRun,
    container_state,
    docker_time,
    flush,
    in_thread,
    kill_container,
    log_tail,
    pause_container,
    read_logs,
    remove_container,
    sample_stats,
    signal_name,
    start_thread,
    unpause_container,
)
from hivemind_worker.engine.executors.images import (
    DOCKER_ERRORS,
    ImageStore,
    docker_reason,
    force_remove,
)
from hivemind_worker.engine.executors.leftovers import (
    LABEL_LEASE,
    LABEL_NODE,
    LABEL_SLOT,
    LABEL_TASK,
    OLD_SPEC_SUFFIX,
    SPEC_SUFFIX,
    SPECS_DIR,
    WARM_DIR,
    forget_spec,
    keep_spec,
    spec_path,
    sweep,
)
from hivemind_worker.engine.executors.runner_images import RunnerImages
from hivemind_worker.engine.executors.warm import WAITER_COMMAND, Shape, Slot, WarmError, WarmPool
from hivemind_worker.engine.executors.workspace import (
    ARCHIVES_DIR,
    discard,
    disk_usage,
    pack_results,
    prepare_workspace,
    rmtree,
    workspace_path,
)
from hivemind_worker.engine.runners.environments import Environments
from hivemind_worker.tasks import (
    MiB,
    Resources,
    TaskKind,
    TaskResult,
    TaskSpec,
    TaskSpecError,
)

log = logging.getLogger(__name__)

__all__ = [  # kept where the tests and benchmarks have always found them
    "LABEL_LEASE",
    "LABEL_NODE",
    "LABEL_SLOT",
    "LABEL_TASK",
    "NOBODY",
    "OLD_SPEC_SUFFIX",
    "SPECS_DIR",
    "SPEC_SUFFIX",
    "DockerExecutor",
    "connect",
    "courtesy_cgroup_parent",
    "worker_user",
]

WORKSPACE_MOUNT = "/workspace"
PIDS_LIMIT = 256
# Docker's smallest CPU weight. On its own it only ranks tasks among Docker's containers;
# the parent cgroup of minimal weight (courtesy_cgroup_parent) puts the person's programs
# ahead of all of them.
CPU_SHARES = 2
# /tmp is the one writable place besides the workspace; tmpfs pages count against the
# container's memory limit, so it is capped well below it.
TMPFS_MAX_BYTES = 256 * MiB
LOG_MAX_SIZE = "10m"
# Every container's environment, before the task's own; the root filesystem is read-only.
BASE_ENV = {"HOME": "/tmp", "TMPDIR": "/tmp", "LANG": "C.UTF-8", "PYTHONDONTWRITEBYTECODE": "1"}
POLL_INTERVAL = 0.1
DRAIN_SECONDS = 5.0
MIN_NANO_CPUS = 10_000_000  # 1 % of a core: Docker refuses a ceiling of less


class DockerExecutor(Executor):
    """Runs container tasks (image + argv) and python tasks (`python3 main.py *argv` in the
    configured Python image) in containers locked down by default:

    all capabilities dropped, no-new-privileges, read-only root filesystem with a size-capped
    tmpfs /tmp, a non-root user (the worker's uid:gid, or 65534:65534 when it runs as root),
    a pids limit, memory limit equal to the memory+swap limit, nano_cpus, the lowest CPU
    weight, network `none` unless the task asks for the one network the settings allow, only
    the task workspace bind-mounted at /workspace (the working folder), labels naming the
    node, task and lease, and a size-capped json-file log. Never privileged, never a host
    path other than the workspace, no devices, never the Docker socket.

    A python task's requirements are installed into a derived image built once per hash of
    the Python image and the requirements (`hivemind-python-req:<hash>`), the only step with
    a network. A task this worker will not run (an image outside the allowlist, a network
    other than the allowed one, pip options such as -r, -e, --index-url in its requirements)
    is refused in prepare() with TaskSpecError, which the engine reports as REJECTED.

    Results are packed from the bind-mounted workspace once the container has exited (no
    process of the task is left to change them), as the process executor packs them: entry by
    entry, never following a link, regular files and folders only, under the file-count and
    byte caps. The wait gives the exit code; the container is inspected only for an exit
    other than 0 (was it the OOM killer?), and its log file is read only when the followed
    output may have missed part of the tail.

    With `warm`, python tasks start in warm sandboxes (warm.py): after each python task a
    fresh container of its shape is made and started, up to one per free slot (`slots`,
    set by the engine), with this executor's own lock-down (warm_config); the next task of
    that shape runs in it without creating or starting a container. Warm sandboxes are
    dropped on pause(), standby(), close() and when the caps change; one made from an image
    that has changed since is not used.

    Status: exit 0 is SUCCEEDED; killed by the kernel's OOM killer is OUT_OF_MEMORY; past
    the timeout (paused time not counted) is TIMED_OUT; cancel() is CANCELLED; a workspace
    grown past the disk request gets the container killed and FAILED ("used more than its
    N MiB disk limit"); any other exit is FAILED. Usage is sampled from the stats API at 1 Hz
    in a thread per container.
    Output is followed in a thread and handed to the log sink (thinned, never buffered
    without bound, when the task outpaces it); the tail in the result is the followed one,
    or the capped log file's end when the followed output may have missed some.

    Housekeeping: remove_leftovers() (at start) adopts containers labelled with this node
    whose task spec it kept (leftovers.py), for the engine to re-attach them with reattach(),
    and removes the others and their workspaces; cleanup() removes the
    container, workspace and kept spec, then prunes the images this worker pulled or built,
    least recently used first, past `image_budget_bytes`. `cgroup_parent` (see
    courtesy_cgroup_parent) puts every container under a parent cgroup of minimal CPU weight
    so the person's own programs come first.
    """

    capability = "docker"

    def __init__(
        self,
        client: docker.DockerClient,
        work_dir: Path,
        node_id: str,
        *,
        python_image: str = "python:3.12-slim",
        pull_policy: str = "if-not-present",
        allowlist: Iterable[str] = (),
        network: str = "none",
        cgroup_parent: str = "",
        user: str | None = None,
        pids_limit: int = PIDS_LIMIT,
        cpu_shares: int = CPU_SHARES,
        log_tail_bytes: int = 64 * 1024,
        max_result_files: int = 10_000,
        image_budget_bytes: int = 0,
        environments: Environments | None = None,
        warm: bool = False,
    ) -> None:
        self._client = client
        self._work_dir = Path(work_dir)
        self._node_id = node_id
        self.images = ImageStore(
            client,
            self._work_dir,
            python_image=python_image,
            pull_policy=pull_policy,
            allowlist=allowlist,
            budget_bytes=image_budget_bytes,
            on_progress=self._pull_progress,
        )
        if environments is not None:  # the ml and data runners, in images of their own
            self.images.runner_images = RunnerImages(client, environments)
            self.runs_runners = True
        self._network = network
        self._cgroup_parent = cgroup_parent
        self._user = user or worker_user()
        self._pids_limit = pids_limit
        self._cpu_shares = cpu_shares
        self._log_tail_bytes = max(int(log_tail_bytes), 0)
        self._max_result_files = max_result_files
        self._workspaces: dict[str, Path] = {}
        self._containers: dict[str, Container] = {}
        self._spec_files: dict[str, Path] = {}
        self._adopted: list[TaskSpec] = []
        self._running: dict[str, ContainerRun] = {}
        self._cancel_requested: set[str] = set()
        self._paused = False
        self._standby = False
        self._closed = False
        self._removing: set[asyncio.Future[None]] = set()
        self._caps_seen: tuple[Resources, float] | None = None
        self._slots: dict[str, Slot] = {}  # the warm sandbox each prepared task took
        self._shapes: dict[str, Shape] = {}  # each prepared python task's, to make the next
        self.warm = (
            WarmPool(client, self._work_dir / WARM_DIR, self.warm_config, self._hand_over)
            if warm
            else None
        )

    @property
    def client(self) -> docker.DockerClient:
        return self._client

    @property
    def archive_dir(self) -> Path:
        """Where result archives are written (the engine deletes them)."""
        return self._work_dir / ARCHIVES_DIR

    def workspace(self, task_id: str) -> Path | None:
        """The workspace of a prepared task, until cleanup."""
        return self._workspaces.get(task_id)

    def container(self, task_id: str) -> Container | None:
        """The container of a task that has started, until cleanup."""
        return self._containers.get(task_id)

    def slot(self, task_id: str) -> Slot | None:
        """The warm sandbox a prepared task took, until cleanup."""
        return self._slots.get(task_id)

    def _pull_progress(self, image: str, done: int, total: int) -> None:
        if self.on_pull is not None:  # set by the engine after construction
            self.on_pull(image, done, total)

    async def preload(self, images: list[str]) -> None:
        await self.images.preload(images)

    # ---------------------------------------------------------------- housekeeping

    def remove_leftovers(self) -> int:
        """Settle what an earlier run of this node left behind (leftovers.sweep); returns how
        many containers were removed. Blocking; called once at start, before any task runs.
        Adopted containers are offered by adoptable() and followed by reattach()."""
        adopted, removed = sweep(self._client, self._work_dir, self._node_id)
        for record in adopted:
            task_id = record.spec.task_id
            self._workspaces[task_id] = record.workspace
            self._containers[task_id] = record.container
            self._spec_files[task_id] = record.spec_file
            self.images.adopt(task_id, record.image)  # kept from pruning while it runs
            self._adopted.append(record.spec)
        return removed

    def adoptable(self) -> list[TaskSpec]:
        adopted, self._adopted = self._adopted, []
        return adopted

    # ---------------------------------------------------------------- prepare

    def runner_problem(self) -> str:
        if self.images.runner_images is None:
            return super().runner_problem()
        try:  # the runners need a Python image with the whole standard library
            self.images.runner_images.python_version(self.images.python_image)
        except ExecutorError as exc:
            return str(exc)
        return ""

    async def prepare(self, task: TaskSpec) -> None:
        if task.task_id in self._running:
            raise ExecutorError(f"task {task.task_id} is already running")
        self.images.check(task)
        if task.network not in ("none", self._network):
            raise TaskSpecError("network", f"'{task.network}' is not allowed on this worker")
        await self.images.acquire(task, self._environment_progress(task.task_id))
        self._standby = False  # a task came: keep sandboxes warm again

        previous = self._workspaces.get(task.task_id)
        if previous is not None:  # prepared before, under another lease
            await self._release(task.task_id)
            await asyncio.to_thread(rmtree, previous)
        shape = self._shape(task)
        slot = None
        if shape is not None and self.warm is not None and not self._paused:
            self._shapes[task.task_id] = shape
            slot = await self.warm.take(shape)
        workspace = slot.workspace if slot is not None else workspace_path(self._work_dir, task)
        self._workspaces[task.task_id] = workspace
        self._spec_files[task.task_id] = spec_path(self._work_dir, task)
        if slot is not None:
            self._slots[task.task_id] = slot
            if slot.container is not None:  # removed by cleanup() like any task's container
                self._containers[task.task_id] = slot.container
        self._cancel_requested.discard(task.task_id)
        try:
            await asyncio.to_thread(self._prepare_sync, task, workspace, slot)
        except BaseException:
            await self._release(task.task_id)
            with contextlib.suppress(OSError):
                await asyncio.to_thread(rmtree, workspace)
            raise

    def _prepare_sync(self, task: TaskSpec, workspace: Path, slot: Slot | None) -> None:
        prepare_workspace(task, workspace, self._work_dir, existing=slot is not None)
        # Kept for re-attaching after a crash; the inputs are in the workspace already.
        path = spec_path(self._work_dir, task)
        keep_spec(path, dataclasses.replace(task, input_files=(), input_archive=b""))
        if slot is not None:
            keep_spec(path, task, slot=slot.name)
        self._hand_over(workspace)

    def _hand_over(self, workspace: Path) -> None:
        hand_over(workspace, self._user)

    def _shape(self, task: TaskSpec) -> Shape | None:
        """A prepared task's shape when it can run in a warm sandbox (python tasks)."""
        image = self.images.image_of(task)
        image_id = self.images.image_ids.get(image, "")
        if task.kind is not TaskKind.PYTHON or not image_id:
            return None
        return Shape(image, image_id, task.resources, self._network_of(task))

    def _network_of(self, task: TaskSpec) -> str:
        return task.network if task.network == self._network else "none"

    # ---------------------------------------------------------------- run

    def container_config(self, task: TaskSpec, workspace: Path) -> dict[str, Any]:
        """The keyword arguments of containers.create() for a task: its command, environment,
        name and labels on sandbox_config()'s lock-down."""
        if task.kind is TaskKind.PYTHON:
            command = ["python3", "main.py", *task.argv]
        else:
            command = list(task.argv)
        results_dir = PurePosixPath(WORKSPACE_MOUNT, *task.result_path.parts)
        config = self.sandbox_config(
            self.images.image_of(task), task.resources, self._network_of(task), workspace
        )
        env = config["environment"]
        env.update({k: v for k, v in task.env.items() if not k.startswith("HIVEMIND_")})
        env["HIVEMIND_TASK_ID"] = task.task_id
        env["HIVEMIND_RESULTS_DIR"] = str(results_dir)
        config["command"] = command
        config["name"] = f"hivemind-{task.task_id}-{(task.lease_id or 'nolease')[:12]}"
        config["labels"] = {
            LABEL_NODE: self._node_id,
            LABEL_TASK: task.task_id,
            LABEL_LEASE: task.lease_id,
        }
        return config

    def warm_config(self, shape: Shape, workspace: Path, slot: str) -> dict[str, Any]:
        """The keyword arguments of containers.create() for a warm sandbox (warm.py): the
        waiter as its command, the slot as its label, on sandbox_config()'s lock-down."""
        config = self.sandbox_config(shape.image, shape.resources, shape.network, workspace)
        config["command"] = list(WAITER_COMMAND)
        config["name"] = f"hivemind-{slot}"
        config["labels"] = {LABEL_NODE: self._node_id, LABEL_SLOT: slot}
        return config

    def sandbox_config(
        self, image: str, resources: Resources, network: str, workspace: Path
    ) -> dict[str, Any]:
        """What every container is made with, a task's or a warm sandbox's: the lock-down
        lives here, and only here."""
        memory = resources.memory_bytes
        tmpfs_bytes = max(min(resources.disk_bytes, TMPFS_MAX_BYTES, memory // 2), MiB)
        config: dict[str, Any] = {
            "image": image,
            "user": self._user,
            "working_dir": WORKSPACE_MOUNT,
            "environment": dict(BASE_ENV),
            "entrypoint": [],
            "network_mode": network,
            "read_only": True,
            "tmpfs": {"/tmp": f"rw,nosuid,nodev,size={tmpfs_bytes}"},
            "mounts": [
                Mount(target=WORKSPACE_MOUNT, source=str(workspace), type="bind", read_only=False)
            ],
            "cap_drop": ["ALL"],
            "security_opt": ["no-new-privileges"],
            "privileged": False,
            "pids_limit": self._pids_limit,
            "mem_limit": memory,
            "memswap_limit": memory,
            "nano_cpus": max(int(resources.cpus * 1e9), 1),
            "cpu_shares": self._cpu_shares,
            "ipc_mode": "private",
            "log_config": LogConfig(
                type=LogConfig.types.JSON, config={"max-size": LOG_MAX_SIZE, "max-file": "2"}
            ),
            "stdin_open": False,
            "tty": False,
        }
        if self._cgroup_parent:
            config["cgroup_parent"] = self._cgroup_parent
        return config

    def cancel_requested(self, task_id: str) -> bool:
        return task_id in self._cancel_requested

    def describe_error(self, exc: Exception) -> str:
        return docker_reason(exc)

    async def _run(
        self,
        task: TaskSpec,
        on_log: LogSink | None,
        workspace: Path,
        result: TaskResult,
    ) -> None:
        config = self.container_config(task, workspace)
        slot = self._slots.get(task.task_id)
        container = slot.container if slot is not None else None
        if container is None:
            try:
                container = await asyncio.to_thread(self._create, config)
            except DOCKER_ERRORS as exc:
                result.error = f"could not create the container: {docker_reason(exc)}"
                return
        self._containers[task.task_id] = container
        run = ContainerRun(task, container, started=time.monotonic(), workspace=workspace)
        run.disk_limit = task.resources.disk_bytes
        # Registered before the start, so cancel() and pause() from here on reach it.
        self._running[task.task_id] = run
        # A cancel() that came while the container was being created found no run to stop.
        run.cancelled = task.task_id in self._cancel_requested
        try:
            try:
                if slot is not None:
                    await asyncio.to_thread(self._launch, slot, config, run)
                    self._containers[task.task_id] = run.container
                else:
                    await asyncio.to_thread(run.container.start)
            except DOCKER_ERRORS as exc:
                run.logs_done.set()  # no output thread was started
                result.error = f"could not start the task: {docker_reason(exc)}"
                return
            run.started = time.monotonic()
            if self._paused or run.cancelled:
                run.paused_at = run.started if self._paused else None
                await asyncio.to_thread(self._freeze_or_kill, run)
            await self._follow(run, on_log)
        finally:
            await self._close_run(run, on_log)
        await self._conclude(run, result, int(config["mem_limit"]))

    async def _reattach(
        self, task: TaskSpec, on_log: LogSink | None, workspace: Path, result: TaskResult
    ) -> None:
        """Follow a container an earlier run of this worker started (remove_leftovers())."""
        container = self._containers.get(task.task_id)
        if container is None:
            raise ExecutorError(f"task {task.task_id} has no container to re-attach to")
        state = await asyncio.to_thread(container_state, container)
        begun = docker_time(str(state.get("StartedAt", "")))
        if begun:
            result.started_at = begun
        # The timeout counts from the container's start, not from this re-attachment.
        elapsed = max(time.time() - begun, 0.0) if begun else 0.0
        run = ContainerRun(task, container, started=time.monotonic() - elapsed, workspace=workspace)
        run.disk_limit = task.resources.disk_bytes
        self._running[task.task_id] = run
        run.cancelled = task.task_id in self._cancel_requested
        try:
            frozen = bool(state.get("Paused"))  # by the earlier run, paused when it died
            if run.cancelled:
                await asyncio.to_thread(kill_container, container)
            elif self._paused:
                run.paused_at = time.monotonic()
                if not frozen:
                    await asyncio.to_thread(pause_container, container)
            elif frozen:
                await asyncio.to_thread(unpause_container, container)
            log.info("re-attached to task %s (%s)", task.task_id, state.get("Status", "?"))
            await self._follow(run, on_log)
        finally:
            await self._close_run(run, on_log)
        memory = int((container.attrs.get("HostConfig") or {}).get("Memory") or 0)
        await self._conclude(run, result, memory or task.resources.memory_bytes)

    def _launch(self, slot: Slot, config: dict[str, Any], run: ContainerRun) -> None:
        """Start the task in its warm sandbox; in a new container if the sandbox fails it."""
        assert self.warm is not None
        try:
            self.warm.launch(slot, config["command"], config["environment"])
        except WarmError as exc:
            log.warning("task %s: %s; starting it in a new container", run.task.task_id, exc)
            remove_container(run.container)
            run.container = self._create(config)
            run.container.start()

    async def _follow(self, run: ContainerRun, on_log: LogSink | None) -> None:
        """Wait for the started container's exit, following its output and usage meanwhile."""
        loop = asyncio.get_running_loop()
        task_id = run.task.task_id
        waiter = in_thread(loop, run.container.wait, f"wait-{task_id}")
        start_thread(read_logs, f"logs-{task_id}", run, loop, on_log, self._log_tail_bytes)
        start_thread(sample_stats, f"stats-{task_id}", run)
        await self._supervise(run, waiter)

    async def _close_run(self, run: ContainerRun, on_log: LogSink | None) -> None:
        run.stop.set()
        if not run.exited:
            # Cancelled from outside (engine shutdown), or a worker error: the
            # container must not outlive the run, whatever interrupted it.
            await asyncio.shield(asyncio.to_thread(kill_container, run.container))
        self._running.pop(run.task.task_id, None)
        await asyncio.to_thread(run.logs_done.wait, DRAIN_SECONDS)
        run.closed = True
        flush(run, on_log)

    async def _conclude(self, run: ContainerRun, result: TaskResult, memory: int) -> None:
        """The exited container's status, output tail, usage and results into `result`."""
        task, container = run.task, run.container
        result.finished_at = time.time()
        code = run.exit_code
        state: dict[str, Any] = {}
        if code != 0:  # the one inspect: the exit code the wait missed, and the OOM flag
            state = await asyncio.to_thread(container_state, container)
            code = int(state.get("ExitCode", -1))
        result.exit_code = code
        # The followed stream can miss output when the log file rotates under it, which
        # cannot happen before the cap's worth of output (the file is 10 MiB of JSON lines):
        # past that, or when the stream broke, the file holds the authoritative end.
        tail: bytes | None = bytes(run.tail)
        if not run.logs_complete or run.output_bytes > self._log_tail_bytes:
            tail = await asyncio.to_thread(log_tail, container, self._log_tail_bytes)
        result.log_tail = tail if tail is not None else bytes(run.tail)
        result.cpu_seconds = run.cpu_seconds
        result.max_memory_bytes = run.max_memory
        settle_status(
            result,
            task,
            cancelled=run.cancelled,
            timed_out=run.timed_out,
            disk_exceeded=run.disk_exceeded,
            disk_limit=run.disk_limit,
            out_of_memory=bool(state.get("OOMKilled")),
            memory_limit=memory,
            failure=(
                f"killed by signal {signal_name(code - 128)}"
                if code > 128
                else f"exited with code {code}"
            ),
        )
        workspace = run.workspace
        assert workspace is not None
        await collect_results(
            result,
            lambda: pack_results(task, workspace, self.archive_dir, self._max_result_files),
            (OSError,),
            "pack",
        )

    def _create(self, config: dict[str, Any]) -> Container:
        try:
            return self._client.containers.create(**config)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
        # A container of the same name is left from an earlier attempt of this lease.
        with contextlib.suppress(docker.errors.NotFound):
            force_remove(self._client.containers.get(config["name"]))
        return self._client.containers.create(**config)

    def _freeze_or_kill(self, run: ContainerRun) -> None:
        if run.cancelled:
            kill_container(run.container)
        else:
            with contextlib.suppress(*DOCKER_ERRORS):
                run.container.pause()

    async def _supervise(self, run: ContainerRun, waiter: asyncio.Future[object]) -> None:
        timeout = run.task.timeout_seconds
        while not waiter.done():
            now = time.monotonic()
            if not run.cancelled and run.paused_at is None and run.active_seconds(now) >= timeout:
                run.timed_out = True
                await asyncio.to_thread(kill_container, run.container)
                break
            # The workspace's size, spaced by the walk's cost (many files: less often).
            due = run.disk_checked_at + max(SAMPLE_INTERVAL, 10 * run.disk_walk_seconds)
            if run.disk_limit > 0 and run.workspace is not None and now >= due:
                used = await asyncio.to_thread(disk_usage, run.workspace, run.disk_limit)
                run.disk_checked_at = time.monotonic()
                run.disk_walk_seconds = run.disk_checked_at - now
                if used > run.disk_limit and not run.cancelled:
                    run.disk_exceeded = True
                    await asyncio.to_thread(kill_container, run.container)
                    break
                continue
            await asyncio.wait({waiter}, timeout=POLL_INTERVAL)
        with contextlib.suppress(*DOCKER_ERRORS):
            status = await waiter  # the exit itself; errors mean the container is gone already
            if isinstance(status, dict) and isinstance(status.get("StatusCode"), int):
                run.exit_code = status["StatusCode"]
        run.exited = True

    # ---------------------------------------------------------------- control

    async def cancel(self, task_id: str) -> None:
        run = self._running.get(task_id)
        if run is None:
            if task_id in self._workspaces:
                self._cancel_requested.add(task_id)
            return
        if not run.timed_out:
            run.cancelled = True
        await asyncio.to_thread(kill_container, run.container)

    async def pause(self) -> None:
        self._paused = True
        await self._drop_warm()
        now = time.monotonic()
        runs = [r for r in self._running.values() if r.paused_at is None and not r.exited]
        for run in runs:
            run.paused_at = now
        await asyncio.gather(*(asyncio.to_thread(pause_container, r.container) for r in runs))

    async def resume(self) -> None:
        self._paused = False
        runs = [r for r in self._running.values() if r.paused_at is not None]
        await asyncio.gather(*(asyncio.to_thread(unpause_container, r.container) for r in runs))
        now = time.monotonic()
        for run in runs:
            if run.paused_at is not None:
                # The paused time is not counted against the task's timeout.
                run.paused_total += now - run.paused_at
                run.paused_at = None

    async def cleanup(self, task_id: str) -> None:
        run = self._running.get(task_id)
        if run is not None:
            if not run.timed_out:
                run.cancelled = True
            await asyncio.to_thread(kill_container, run.container)
        self._cancel_requested.discard(task_id)
        self.images.release(task_id)
        shape = self._shapes.get(task_id)
        await self._release(task_id, wait=False)
        workspace = self._workspaces.pop(task_id, None)
        if workspace is not None:
            # Moved aside at once, deleted in the background: the report waits for cleanup().
            await asyncio.to_thread(discard, workspace, self._work_dir)
        if shape is not None and self.warm is not None and self._keeps_warm():
            # A fresh sandbox for the next task of this shape, made in the background.
            self.warm.fill(shape, self.slots - len(self._running))
        await self.images.prune_to_budget()

    async def _release(self, task_id: str, *, wait: bool = True) -> None:
        """The task's container removed (a warm sandbox's too), its kept spec forgotten.

        Without `wait` the removal goes on in the background (settle() and close() wait for
        it): a stopped container holds nothing the next task needs, and the result's report
        should not wait for it.
        """
        self._slots.pop(task_id, None)
        self._shapes.pop(task_id, None)
        container = self._containers.pop(task_id, None)
        spec_file = self._spec_files.pop(task_id, None)
        if spec_file is not None:
            await asyncio.to_thread(forget_spec, spec_file)
        if container is not None:
            removal = asyncio.ensure_future(asyncio.to_thread(remove_container, container))
            self._removing.add(removal)
            removal.add_done_callback(self._removing.discard)
            if wait:
                await removal

    async def settle(self) -> None:
        """Wait until no container is being removed and no warm sandbox is being made."""
        while self._removing:
            await asyncio.gather(*list(self._removing), return_exceptions=True)
        if self.warm is not None:
            await self.warm.settle()

    def _keeps_warm(self) -> bool:
        return not (self._paused or self._standby or self._closed)

    async def _drop_warm(self) -> None:
        if self.warm is not None:
            await self.warm.drop()

    async def standby(self) -> None:
        """No task is coming for now (contributing stopped or draining): no warm sandbox is
        kept until the next task is prepared."""
        self._standby = True
        await self._drop_warm()

    def usage(self) -> dict[str, Usage]:
        return {task_id: run.usage for task_id, run in self._running.items()}

    async def apply_caps(self, caps: Resources) -> None:
        """Scale running containers' CPU ceilings down to fit new caps (back up as they grow).

        CPU is the one limit Docker can change safely in flight; memory is left alone (a
        lower limit than a task holds would kill it) and the new caps bound new tasks.
        """
        if self._caps_seen != (caps, self.cpu_time_share):
            await self._drop_warm()  # made for the old caps: the next ones fit the new
        self._caps_seen = (caps, self.cpu_time_share)
        runs = [r for r in self._running.values() if not r.exited]
        wanted = sum(r.task.resources.cpus for r in runs)
        factor = min(1.0, caps.cpus / wanted) if wanted > 0 and caps.cpus > 0 else 1.0
        factor *= self.cpu_time_share  # the policy's "use at most X % of CPU time"
        await asyncio.gather(
            *(
                asyncio.to_thread(
                    self._set_nano_cpus,
                    r.container,
                    max(int(r.task.resources.cpus * factor * 1e9), MIN_NANO_CPUS),
                )
                for r in runs
            )
        )

    def _set_nano_cpus(self, container: Container, nano_cpus: int) -> None:
        # docker-py's update_container() predates NanoCpus; the engine's API takes it.
        api = self._client.api
        url = f"{api.base_url}/v{api.api_version}/containers/{container.id}/update"
        try:
            response = api.post(url, json={"NanoCpus": nano_cpus})
            response.raise_for_status()
        except DOCKER_ERRORS as exc:  # it may have exited meanwhile
            log.debug("cannot update the CPU limit of %s: %s", container.short_id, exc)

    async def close(self) -> None:
        self._closed = True
        runs = list(self._running.values())
        for run in runs:
            if not run.timed_out:
                run.cancelled = True
        await asyncio.gather(
            *(asyncio.to_thread(kill_container, r.container) for r in runs), self._drop_warm()
        )
        await self.settle()
