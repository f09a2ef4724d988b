"""DockerExecutor: tasks in locked-down containers through the Docker engine's API."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import io
import json
import logging
import os
import signal
import sys
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import Any, TypeVar

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container
from docker.types import LogConfig, Mount
from google.protobuf.message import DecodeError

from hivemind_worker.engine.executors.base import (
    Executor,
    ExecutorError,
    LogSink,
    PausableRun,
    Usage,
)
from hivemind_worker.engine.executors.workspace import (
    ARCHIVES_DIR,
    ResultError,
    prepare_workspace,
    repack_results,
    rmtree,
    workspace_path,
    write_archive,
)
from hivemind_worker.engine.tasks import (
    MiB,
    Resources,
    TaskKind,
    TaskResult,
    TaskSpec,
    TaskSpecError,
    TaskStatus,
)
from hivemind_worker.protocol import nodepool_pb2 as pb

log = logging.getLogger(__name__)

T = TypeVar("T")

LABEL_NODE = "hivemind.node"
LABEL_TASK = "hivemind.task"
LABEL_LEASE = "hivemind.lease"
LABEL_REQUIREMENTS = "hivemind.requirements"
REQUIREMENTS_REPOSITORY = "hivemind-python-req"
WORKSPACE_MOUNT = "/workspace"
# The unprivileged user tasks run as when the worker itself runs as root.
NOBODY = "65534:65534"
PIDS_LIMIT = 256
# Docker's smallest CPU weight. On its own it only ranks tasks among Docker's containers;
# the parent cgroup of minimal weight (courtesy_cgroup_parent) puts the person's programs
# ahead of all of them.
CPU_SHARES = 2
# /tmp is the one writable place besides the workspace; tmpfs pages count against the
# container's memory limit, so it is capped well below it.
TMPFS_MAX_BYTES = 256 * MiB
LOG_MAX_SIZE = "10m"
SAMPLE_INTERVAL = 1.0
POLL_INTERVAL = 0.1
DRAIN_SECONDS = 5.0
API_TIMEOUT = 60
# Output waiting for the engine loop; beyond this the oldest is dropped, so a task printing
# faster than the log sink consumes cannot grow the worker.
PENDING_OUTPUT_CAP = 256 * 1024
PULL_POLICIES = ("if-not-present", "always", "never")
PULL_REPORT_INTERVAL = 0.5
MIN_NANO_CPUS = 10_000_000  # 1 % of a core: Docker refuses a ceiling of less
IMAGES_FILE = "_images.json"  # in the work folder: images this worker pulled, by last use
# In the work folder, beside (never inside: the task could rewrite it) each workspace: the spec
# of every prepared task, `<task>-<lease>.pb`, so that a restarted worker can re-attach.
SPECS_DIR = "_specs"
ADOPTABLE_STATES = ("running", "paused", "exited")

_DockerErrors = (docker.errors.DockerException, requests.exceptions.RequestException)


def connect(timeout: int = API_TIMEOUT) -> docker.DockerClient:
    """A client for the local engine (DOCKER_HOST, the socket, or Docker Desktop's pipe).

    The pool is sized for three long-lived streams per running container (wait, logs,
    stats) so requests never queue behind them.
    """
    return docker.from_env(version="auto", timeout=timeout, max_pool_size=64)


def worker_user() -> str:
    """uid:gid for task containers: the worker's own, or nobody's when it runs as root."""
    getuid = getattr(os, "getuid", None)
    getgid = getattr(os, "getgid", None)
    if getuid is None or getgid is None or getuid() == 0:
        return NOBODY
    return f"{getuid()}:{getgid()}"


def normalize_image(image: str) -> str:
    """The full reference Docker uses: 'python:3.12' is 'docker.io/library/python:3.12'."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return image
    return "docker.io/" + (image if sep else "library/" + image)


def image_allowed(image: str, allowlist: Iterable[str]) -> bool:
    """Whether `image` matches a registry prefix or digest of the allowlist (empty: any)."""
    entries = [e.strip() for e in allowlist if e.strip()]
    if not entries:
        return True
    ref = normalize_image(image)
    for entry in entries:
        if entry.startswith("sha256:"):
            if image.endswith("@" + entry):
                return True
            continue
        # A prefix matches at a path boundary ("ghcr.io/org/" or "ghcr.io/org"), or a whole
        # repository with any tag or digest ("docker.io/library/python").
        if entry.endswith("/"):
            if ref.startswith(entry):
                return True
        elif ref == entry or (ref.startswith(entry) and ref[len(entry)] in "/:@"):
            return True
    return False


def requirements_tag(python_image: str, requirements: Iterable[str]) -> str:
    """The tag of the derived image holding these requirements on top of `python_image`."""
    key = hashlib.sha256("\n".join([python_image, *requirements]).encode()).hexdigest()
    return f"{REQUIREMENTS_REPOSITORY}:{key[:16]}"


def parse_allowlist(text: str) -> tuple[str, ...]:
    return tuple(e.strip() for e in text.split(",") if e.strip())


@dataclass(eq=False)
class _Running(PausableRun):
    task: TaskSpec
    container: Container
    started: float  # time.monotonic()
    paused_at: float | None = None
    paused_total: float = 0.0
    cancelled: bool = False
    timed_out: bool = False
    exited: bool = False
    closed: bool = False  # the run has returned; output threads stop
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    logs_done: threading.Event = field(default_factory=threading.Event)
    usage: Usage = field(default_factory=Usage)
    cpu_seconds: float = 0.0
    max_memory: int = 0
    tail: bytearray = field(default_factory=bytearray)
    output_bytes: int = 0
    pending: bytearray = field(default_factory=bytearray)
    dropped: int = 0
    flush_scheduled: bool = False


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

    Results are copied out of /workspace/<result_path> with get_archive and re-packed entry
    by entry (regular files and folders only, no absolute names or '..', under the file-count
    and byte caps) into the same archive format as the process executor.

    Status: exit 0 is SUCCEEDED; killed by the kernel's OOM killer is OUT_OF_MEMORY; past
    the timeout (paused time not counted) is TIMED_OUT; cancel() is CANCELLED; any other exit
    is FAILED. Usage is sampled from the stats API at 1 Hz in a thread per container.
    Output is followed in a thread and handed to the log sink (thinned, never buffered
    without bound, when the task outpaces it); the tail in the result comes from the capped
    log file once the container has stopped.

    Housekeeping: remove_leftovers() (at start) adopts containers labelled with this node
    whose task spec it kept (SPECS_DIR, beside the workspaces), for the engine to re-attach
    them with reattach(), and removes the others and their workspaces; cleanup() removes the
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
    ) -> None:
        if pull_policy not in PULL_POLICIES:
            raise ValueError(f"pull policy must be one of {', '.join(PULL_POLICIES)}")
        self._client = client
        self._work_dir = Path(work_dir)
        self._node_id = node_id
        self._python_image = python_image
        self._pull_policy = pull_policy
        self._allowlist = tuple(allowlist)
        self._preloaded: set[str] = set()
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
        self._running: dict[str, _Running] = {}
        self._cancel_requested: set[str] = set()
        self._paused = False
        self._images: dict[str, str] = {}  # the image each prepared task runs
        self._build_locks: dict[str, threading.Lock] = {}
        self._build_locks_lock = threading.Lock()
        self._images_used = _ImageLedger(self._work_dir / IMAGES_FILE)
        self._image_budget = image_budget_bytes

    @property
    def client(self) -> docker.DockerClient:
        return self._client

    @property
    def archive_dir(self) -> Path:
        """Where result archives are written (the engine deletes them)."""
        return self._work_dir / ARCHIVES_DIR

    @property
    def cgroup_parent(self) -> str:
        return self._cgroup_parent

    def workspace(self, task_id: str) -> Path | None:
        """The workspace of a prepared task, until cleanup."""
        return self._workspaces.get(task_id)

    def container(self, task_id: str) -> Container | None:
        """The container of a task that has started, until cleanup."""
        return self._containers.get(task_id)

    # ---------------------------------------------------------------- housekeeping

    def remove_leftovers(self) -> int:
        """Settle what an earlier run of this node left behind; returns how many containers
        were removed. Blocking; called once at start, before any task runs.

        A labelled container that still runs (or is paused), or has exited without its result
        collected, is adopted when its task's spec was kept (SPECS_DIR): adoptable() offers it
        and reattach() follows it to its end. Every other labelled container is removed with
        its workspace, and so is a kept spec's workspace when no container is adopted for it.
        """
        found = self._client.containers.list(
            all=True, filters={"label": f"{LABEL_NODE}={self._node_id}"}
        )
        work_dir = self._work_dir.resolve()
        adopted: set[str] = set()
        removed = 0
        for container in found:
            spec = self._adoptable_spec(container)
            if spec is not None:
                self._workspaces[spec.task_id] = workspace_path(self._work_dir, spec)
                self._containers[spec.task_id] = container
                self._spec_files[spec.task_id] = self._spec_path(spec)
                # Kept from pruning while it runs, as for a prepared task.
                self._images[spec.task_id] = str((container.attrs.get("Config") or {}).get("Image"))
                self._adopted.append(spec)
                adopted.add(self._spec_path(spec).stem)
                log.info(
                    "adopting container %s (%s) of task %s left by an earlier run",
                    container.short_id,
                    container.status,
                    spec.task_id,
                )
                continue
            sources = [m.get("Source", "") for m in container.attrs.get("Mounts", [])]
            log.info("removing container %s left by an earlier run", container.short_id)
            with contextlib.suppress(docker.errors.NotFound):
                container.remove(force=True, v=True)
            removed += 1
            for source in sources:
                path = Path(source).resolve() if source else None
                # Only a workspace of ours: a direct child of the work folder.
                if (
                    path is not None
                    and path.parent == work_dir
                    and path.name not in (ARCHIVES_DIR, SPECS_DIR)
                ):
                    rmtree(path)
        specs = self._work_dir / SPECS_DIR
        for kept in sorted(specs.glob("*.pb")) if specs.is_dir() else ():
            if kept.stem in adopted:
                continue
            # The task's workspace has the spec file's name (workspace_path).
            orphan = self._work_dir / kept.stem
            if orphan.is_dir() and not orphan.is_symlink():
                rmtree(orphan)
            kept.unlink(missing_ok=True)
        return removed

    def adoptable(self) -> list[TaskSpec]:
        adopted, self._adopted = self._adopted, []
        return adopted

    def _spec_path(self, task: TaskSpec) -> Path:
        return self._work_dir / SPECS_DIR / f"{task.task_id}-{task.lease_id or 'nolease'}.pb"

    def _adoptable_spec(self, container: Container) -> TaskSpec | None:
        """The kept spec of a container this run can follow, or None (it is removed)."""
        labels = container.labels or {}
        task_id = labels.get(LABEL_TASK, "")
        lease_id = labels.get(LABEL_LEASE, "")
        if container.status not in ADOPTABLE_STATES or not task_id or not lease_id:
            return None
        if task_id in self._workspaces:  # a second container of the task: keep one at most
            return None
        path = self._work_dir / SPECS_DIR / f"{task_id}-{lease_id}.pb"
        if path.parent != self._work_dir / SPECS_DIR:  # a label naming another folder
            return None
        try:
            wire = pb.TaskSpec()
            wire.ParseFromString(path.read_bytes())
            spec = TaskSpec.from_proto(wire, require_lease=True)
        except (OSError, DecodeError, TaskSpecError) as exc:
            log.info("container %s cannot be re-attached: %s", container.short_id, exc)
            return None
        if spec.task_id != task_id or spec.lease_id != lease_id:
            return None
        if not workspace_path(self._work_dir, spec).is_dir():
            return None
        return spec

    # ---------------------------------------------------------------- prepare

    def image_for(self, task: TaskSpec) -> str:
        return task.image if task.kind is TaskKind.CONTAINER else self._python_image

    async def prepare(self, task: TaskSpec) -> None:
        if task.task_id in self._running:
            raise ExecutorError(f"task {task.task_id} is already running")
        for line in task.requirements if task.kind is TaskKind.PYTHON else ():
            if line.lstrip().startswith("-"):
                # -r, -e, --index-url and friends would reach files or servers of their choosing.
                raise TaskSpecError(
                    "requirements",
                    f"{line[:80]!r} is a pip option; only package requirements are allowed",
                )
        image = self.image_for(task)
        # The Python image is the person's own choice; only images a task names are checked.
        if task.kind is TaskKind.CONTAINER and not image_allowed(image, self._allowlist):
            raise TaskSpecError("image", f"{image} is not in this worker's image allowlist")
        if task.network not in ("none", self._network):
            raise TaskSpecError("network", f"'{task.network}' is not allowed on this worker")
        await asyncio.to_thread(self._ensure_image, image)
        if task.kind is TaskKind.PYTHON and task.requirements:
            image = await asyncio.to_thread(self._requirements_image, task.requirements)
        self._images[task.task_id] = image
        await asyncio.to_thread(self._images_used.touch, image, only_known=True)

        workspace = workspace_path(self._work_dir, task)
        previous = self._workspaces.get(task.task_id)
        if previous is not None and previous != workspace:
            await self._remove_container(task.task_id)
            await asyncio.to_thread(rmtree, previous)
            stale = self._spec_files.pop(task.task_id, None)
            if stale is not None:
                await asyncio.to_thread(stale.unlink, missing_ok=True)
        self._workspaces[task.task_id] = workspace
        self._spec_files[task.task_id] = self._spec_path(task)
        self._cancel_requested.discard(task.task_id)
        try:
            await asyncio.to_thread(self._prepare_sync, task, workspace)
        except BaseException:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(rmtree, workspace)
            raise

    def _prepare_sync(self, task: TaskSpec, workspace: Path) -> None:
        prepare_workspace(task, workspace, self._work_dir)
        # Kept for re-attaching after a crash; the inputs are in the workspace already.
        kept = dataclasses.replace(task, input_files=(), input_archive=b"")
        path = self._spec_path(task)
        try:
            path.parent.mkdir(exist_ok=True, mode=0o700)
            partial = path.with_suffix(".partial")
            partial.write_bytes(kept.to_proto().SerializeToString())
            partial.replace(path)
        except OSError as exc:
            raise ExecutorError(f"cannot keep the task's spec in {path.parent}: {exc}") from exc
        if self._user == NOBODY and hasattr(os, "lchown"):
            # The worker is root and the task is not: hand it the workspace it must write.
            try:
                _chown_tree(workspace, 65534, 65534)
            except OSError as exc:
                raise ExecutorError(f"cannot hand the workspace to the task user: {exc}") from exc

    def ensure_image(self, image: str) -> None:
        """Blocking: make `image` present under the pull policy, or raise ExecutorError."""
        self._ensure_image(image)

    async def preload(self, images: list[str]) -> None:
        """Pull what the pool names ahead of its tasks, within the allowlist; failures are
        only logged (the task that needs the image reports them)."""
        for image in images:
            if image in self._preloaded:
                continue
            self._preloaded.add(image)
            if not image_allowed(image, self._allowlist):
                log.warning("not preloading %s: the image allowlist does not admit it", image)
                continue
            try:
                await asyncio.to_thread(self._ensure_image, image)
            except ExecutorError as exc:
                log.warning("could not preload %s: %s", image, exc)
            else:
                log.info("image %s is ready for the pool's tasks", image)

    def _ensure_image(self, image: str) -> None:
        """Apply the pull policy; a failed pull fails the task with the registry's message."""
        if self._pull_policy != "always":
            try:
                self._client.images.get(image)
                return
            except docker.errors.ImageNotFound:
                if self._pull_policy == "never":
                    raise ExecutorError(
                        f"image {image} is not on this machine and the pull policy is 'never'"
                    ) from None
            except _DockerErrors as exc:
                raise ExecutorError(f"cannot look up image {image}: {_reason(exc)}") from exc
        repository, tag = docker.utils.parse_repository_tag(image)
        log.info("pulling image %s", image)
        layers: dict[str, tuple[int, int]] = {}  # layer id: (bytes done, bytes total)
        reported = 0.0
        try:
            # A reference without a tag would pull every tag of the repository.
            for event in self._client.api.pull(
                repository, tag=tag or "latest", stream=True, decode=True
            ):
                if not isinstance(event, dict):
                    continue
                if event.get("error"):
                    raise ExecutorError(f"cannot pull image {image}: {event['error']}")
                detail = event.get("progressDetail") or {}
                if event.get("id") and detail.get("total"):
                    layers[str(event["id"])] = (int(detail.get("current", 0)), int(detail["total"]))
                now = time.monotonic()
                if now - reported >= PULL_REPORT_INTERVAL:
                    reported = now
                    self._report_pull(image, layers, finished=False)
        except _DockerErrors as exc:
            raise ExecutorError(f"cannot pull image {image}: {_reason(exc)}") from exc
        self._report_pull(image, layers, finished=True)
        self._images_used.touch(image)

    def _report_pull(
        self, image: str, layers: dict[str, tuple[int, int]], *, finished: bool
    ) -> None:
        total = sum(t for _, t in layers.values())
        done = total if finished else sum(min(c, t) for c, t in layers.values())
        if finished:
            log.info("pulled image %s (%d MiB)", image, total >> 20)
        sink = self.on_pull
        if sink is None:
            return
        try:
            sink(image, done, total)
        except Exception:
            log.exception("pull progress sink failed for %s", image)

    def _requirements_image(self, requirements: tuple[str, ...]) -> str:
        """The Python image with these requirements installed, built once per requirements hash.

        The build is the only step with a network (Docker's default bridge); pip runs as
        65534:65534 and installs into /opt/hivemind-deps, which is on the image's PYTHONPATH.
        """
        tag = requirements_tag(self._python_image, requirements)
        with self._build_locks_lock:
            lock = self._build_locks.setdefault(tag, threading.Lock())
        with lock:  # one build per tag, however many tasks ask for it at once
            try:
                self._client.images.get(tag)
                return tag
            except docker.errors.ImageNotFound:
                pass
            except _DockerErrors as exc:
                raise ExecutorError(f"cannot look up image {tag}: {_reason(exc)}") from exc
            log.info("building %s for %d requirement(s)", tag, len(requirements))
            last = ""
            try:
                for event in self._client.api.build(
                    fileobj=_requirements_context(self._python_image, requirements),
                    custom_context=True,
                    tag=tag,
                    rm=True,
                    forcerm=True,
                    pull=False,
                    network_mode="bridge",
                    labels={LABEL_REQUIREMENTS: tag.rpartition(":")[2]},
                    decode=True,
                ):
                    if not isinstance(event, dict):
                        continue
                    if event.get("error"):
                        detail = f" ({last})" if last else ""
                        raise ExecutorError(
                            f"installing the requirements failed: {event['error'].strip()}{detail}"
                        )
                    line = str(event.get("stream", "")).strip()
                    if line and not line.startswith(("Step ", "--->", "Removing intermediate")):
                        last = line[-300:]
            except _DockerErrors as exc:
                raise ExecutorError(f"installing the requirements failed: {_reason(exc)}") from exc
            self._images_used.touch(tag)
            return tag

    # ---------------------------------------------------------------- run

    def container_config(self, task: TaskSpec, caps: Resources, workspace: Path) -> dict[str, Any]:
        """The keyword arguments of containers.create() for a task: the lockdown lives here."""
        memory = caps.memory_bytes if caps.memory_bytes > 0 else task.resources.memory_bytes
        disk = caps.disk_bytes if caps.disk_bytes > 0 else task.resources.disk_bytes
        cpus = caps.cpus if caps.cpus > 0 else task.resources.cpus
        tmpfs_bytes = max(min(disk, TMPFS_MAX_BYTES, memory // 2), MiB)
        if task.kind is TaskKind.PYTHON:
            command = ["python3", "main.py", *task.argv]
        else:
            command = list(task.argv)
        results_dir = PurePosixPath(WORKSPACE_MOUNT, *task.result_path.parts)
        env = {
            "HOME": "/tmp",
            "TMPDIR": "/tmp",
            "LANG": "C.UTF-8",
            "PYTHONDONTWRITEBYTECODE": "1",  # the root filesystem is read-only anyway
        }
        env.update({k: v for k, v in task.env.items() if not k.startswith("HIVEMIND_")})
        env["HIVEMIND_TASK_ID"] = task.task_id
        env["HIVEMIND_RESULTS_DIR"] = str(results_dir)
        config: dict[str, Any] = {
            "image": self._images.get(task.task_id) or self.image_for(task),
            "command": command,
            "name": f"hivemind-{task.task_id}-{(task.lease_id or 'nolease')[:12]}",
            "labels": {
                LABEL_NODE: self._node_id,
                LABEL_TASK: task.task_id,
                LABEL_LEASE: task.lease_id,
            },
            "user": self._user,
            "working_dir": WORKSPACE_MOUNT,
            "environment": env,
            "entrypoint": [],
            "network_mode": task.network if task.network == self._network else "none",
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
            "nano_cpus": max(int(cpus * 1e9), 1),
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
        return _reason(exc)

    async def _run(
        self,
        task: TaskSpec,
        caps: Resources,
        on_log: LogSink | None,
        workspace: Path,
        result: TaskResult,
    ) -> None:
        config = self.container_config(task, caps, workspace)
        try:
            container = await asyncio.to_thread(self._create, config)
        except _DockerErrors as exc:
            result.error = f"could not create the container: {_reason(exc)}"
            return
        self._containers[task.task_id] = container
        run = _Running(task, container, started=time.monotonic())
        # Registered before the start, so cancel() and pause() from here on reach it.
        self._running[task.task_id] = run
        # A cancel() that came while the container was being created found no run to stop.
        run.cancelled = task.task_id in self._cancel_requested
        try:
            try:
                await asyncio.to_thread(container.start)
            except _DockerErrors as exc:
                run.logs_done.set()  # no output thread was started
                result.error = f"could not start the task: {_reason(exc)}"
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
        state = await asyncio.to_thread(_state, container)
        begun = _docker_time(str(state.get("StartedAt", "")))
        if begun:
            result.started_at = begun
        # The timeout counts from the container's start, not from this re-attachment.
        elapsed = max(time.time() - begun, 0.0) if begun else 0.0
        run = _Running(task, container, started=time.monotonic() - elapsed)
        self._running[task.task_id] = run
        run.cancelled = task.task_id in self._cancel_requested
        try:
            frozen = bool(state.get("Paused"))  # by the earlier run, paused when it died
            if run.cancelled:
                await asyncio.to_thread(_kill, container)
            elif self._paused:
                run.paused_at = time.monotonic()
                if not frozen:
                    await asyncio.to_thread(_pause, container)
            elif frozen:
                await asyncio.to_thread(_unpause, container)
            log.info("re-attached to task %s (%s)", task.task_id, state.get("Status", "?"))
            await self._follow(run, on_log)
        finally:
            await self._close_run(run, on_log)
        memory = int((container.attrs.get("HostConfig") or {}).get("Memory") or 0)
        await self._conclude(run, result, memory or task.resources.memory_bytes)

    async def _follow(self, run: _Running, on_log: LogSink | None) -> None:
        """Wait for the started container's exit, following its output and usage meanwhile."""
        loop = asyncio.get_running_loop()
        task_id = run.task.task_id
        waiter = _in_thread(loop, run.container.wait, f"wait-{task_id}")
        _start_thread(self._read_logs, f"logs-{task_id}", run, loop, on_log)
        _start_thread(self._sample_stats, f"stats-{task_id}", run)
        await self._supervise(run, waiter)

    async def _close_run(self, run: _Running, on_log: LogSink | None) -> None:
        run.stop.set()
        if not run.exited:
            # Cancelled from outside (engine shutdown), or a worker error: the
            # container must not outlive the run, whatever interrupted it.
            await asyncio.shield(asyncio.to_thread(_kill, run.container))
        self._running.pop(run.task.task_id, None)
        await asyncio.to_thread(run.logs_done.wait, DRAIN_SECONDS)
        run.closed = True
        self._flush(run, on_log)

    async def _conclude(self, run: _Running, result: TaskResult, memory: int) -> None:
        """The exited container's status, output tail, usage and results into `result`."""
        task, container = run.task, run.container
        result.finished_at = time.time()
        state = await asyncio.to_thread(_state, container)
        code = int(state.get("ExitCode", -1))
        result.exit_code = code
        # The followed stream can miss output when the log file rotates under it; the file
        # itself (capped by max-size) holds the authoritative end.
        tail = await asyncio.to_thread(_log_tail, container, self._log_tail_bytes)
        result.log_tail = tail if tail is not None else bytes(run.tail)
        result.cpu_seconds = run.cpu_seconds
        result.max_memory_bytes = run.max_memory
        if run.cancelled:
            result.status = TaskStatus.CANCELLED
            result.error = "cancelled"
        elif run.timed_out:
            result.status = TaskStatus.TIMED_OUT
            result.error = f"killed after {task.timeout_seconds} s timeout"
        elif state.get("OOMKilled"):
            result.status = TaskStatus.OUT_OF_MEMORY
            result.error = f"ran out of memory (limit {memory // MiB} MiB)"
        elif code == 0:
            result.status = TaskStatus.SUCCEEDED
        elif code > 128:
            result.error = f"killed by signal {_signal_name(code - 128)}"
        else:
            result.error = f"exited with code {code}"
        if result.status is TaskStatus.CANCELLED:
            return
        try:
            archive, digest, size = await asyncio.to_thread(self._collect, task, container)
        except (ResultError, OSError, *_DockerErrors) as exc:
            reason = str(exc) if isinstance(exc, ResultError) else f"cannot copy results: {exc}"
            if result.status is TaskStatus.SUCCEEDED:
                result.status = TaskStatus.FAILED
                result.error = reason
            else:
                result.error = f"{result.error}; results not collected: {reason}"
            return
        result.archive, result.archive_sha256, result.archive_size = archive, digest, size

    def _create(self, config: dict[str, Any]) -> Container:
        try:
            return self._client.containers.create(**config)
        except docker.errors.APIError as exc:
            if exc.status_code != 409:
                raise
        # A container of the same name is left from an earlier attempt of this lease.
        with contextlib.suppress(docker.errors.NotFound):
            self._client.containers.get(config["name"]).remove(force=True, v=True)
        return self._client.containers.create(**config)

    def _freeze_or_kill(self, run: _Running) -> None:
        if run.cancelled:
            _kill(run.container)
        else:
            with contextlib.suppress(*_DockerErrors):
                run.container.pause()

    async def _supervise(self, run: _Running, waiter: asyncio.Future[object]) -> None:
        timeout = run.task.timeout_seconds
        while not waiter.done():
            now = time.monotonic()
            if not run.cancelled and run.paused_at is None and run.active_seconds(now) >= timeout:
                run.timed_out = True
                await asyncio.to_thread(_kill, run.container)
                break
            await asyncio.wait({waiter}, timeout=POLL_INTERVAL)
        with contextlib.suppress(*_DockerErrors):
            await waiter  # the exit itself; errors mean the container is gone already
        run.exited = True

    def _read_logs(
        self, run: _Running, loop: asyncio.AbstractEventLoop, on_log: LogSink | None
    ) -> None:
        """Follow the container's output (in a thread): keep the tail, hand chunks to the loop."""
        cap = self._log_tail_bytes
        try:
            stream: Iterator[bytes] = run.container.logs(stream=True, follow=True)
            for chunk in stream:
                if run.closed:
                    break  # the result is out; what still trickles in has no reader
                with run.lock:
                    run.output_bytes += len(chunk)
                    # Only the tail is kept: a task printing gigabytes must not grow the worker.
                    run.tail += chunk
                    if len(run.tail) > cap:
                        del run.tail[: len(run.tail) - cap]
                    if on_log is None:
                        continue
                    run.pending += chunk
                    if len(run.pending) > PENDING_OUTPUT_CAP:
                        extra = len(run.pending) - PENDING_OUTPUT_CAP
                        run.dropped += extra
                        del run.pending[:extra]
                    if run.flush_scheduled:
                        continue
                    run.flush_scheduled = True
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                    loop.call_soon_threadsafe(self._flush, run, on_log)
        except Exception as exc:  # the engine went away, the socket broke: the run goes on
            log.debug("output of task %s ended: %s", run.task.task_id, exc)
        finally:
            run.logs_done.set()

    def _flush(self, run: _Running, on_log: LogSink | None) -> None:
        with run.lock:
            data, dropped = bytes(run.pending), run.dropped
            run.pending.clear()
            run.dropped = 0
            run.flush_scheduled = False
        if on_log is None or not (data or dropped):
            return
        if dropped:
            data = f"\n[... {dropped} bytes of output skipped ...]\n".encode() + data
        try:
            on_log(run.task.task_id, data)
        except Exception:
            log.exception("log sink failed for task %s", run.task.task_id)

    def _sample_stats(self, run: _Running) -> None:
        """Sample CPU and memory once a second (in a thread) until the run ends."""
        previous: tuple[float, float] | None = None  # (monotonic, cpu seconds)
        while not run.stop.is_set():
            try:
                stats = run.container.stats(stream=False, one_shot=True)
            except docker.errors.NotFound:
                return
            except Exception as exc:  # a missed sample is only a gap in the usage figures
                log.debug("stats of task %s: %s", run.task.task_id, exc)
                stats = None
            if stats is not None and stats.get("cpu_stats"):
                now = time.monotonic()
                cpu = stats["cpu_stats"].get("cpu_usage", {}).get("total_usage", 0) / 1e9
                memory_stats = stats.get("memory_stats") or {}
                inner = memory_stats.get("stats") or {}
                # v1 counts page cache in usage ("cache"), v2 as "inactive_file".
                memory = int(memory_stats.get("usage", 0)) - int(
                    inner.get("cache", inner.get("inactive_file", 0))
                )
                memory = max(memory, 0)
                percent = 0.0
                if previous is not None and now > previous[0]:
                    percent = max(cpu - previous[1], 0.0) / (now - previous[0]) * 100
                if cpu > 0 or previous is None:
                    previous = (now, cpu)
                run.cpu_seconds = max(run.cpu_seconds, cpu)
                run.max_memory = max(run.max_memory, memory, int(memory_stats.get("max_usage", 0)))
                networks = (stats.get("networks") or {}).values()  # absent on network none
                run.usage = Usage(
                    cpu_percent=percent,
                    memory_bytes=memory,
                    cpu_seconds=run.cpu_seconds,
                    network_rx_bytes=sum(int(n.get("rx_bytes", 0)) for n in networks),
                    network_tx_bytes=sum(int(n.get("tx_bytes", 0)) for n in networks),
                )
            run.stop.wait(SAMPLE_INTERVAL)

    # ---------------------------------------------------------------- results

    def _collect(self, task: TaskSpec, container: Container) -> tuple[Path, str, int]:
        path = str(PurePosixPath(WORKSPACE_MOUNT, *task.result_path.parts))
        try:
            chunks, stat = container.get_archive(path)
        except docker.errors.NotFound:
            # The task removed its results folder: an archive with no entries.
            return write_archive(task, self.archive_dir, lambda tar: None)
        # get_archive follows a symlink at the path itself; the tar would hold its target.
        mode = int(stat.get("mode", 0))
        if stat.get("linkTarget") or not mode & (1 << 31):  # Go's os.ModeDir bit
            raise ResultError(
                f"{task.result_path} is not a folder (a link or a file); results are refused"
            )
        return repack_results(chunks, task, self.archive_dir, self._max_result_files)

    # ---------------------------------------------------------------- control

    async def cancel(self, task_id: str) -> None:
        run = self._running.get(task_id)
        if run is None:
            if task_id in self._workspaces:
                self._cancel_requested.add(task_id)
            return
        if not run.timed_out:
            run.cancelled = True
        await asyncio.to_thread(_kill, run.container)

    async def pause(self) -> None:
        self._paused = True
        now = time.monotonic()
        runs = [r for r in self._running.values() if r.paused_at is None and not r.exited]
        for run in runs:
            run.paused_at = now
        await asyncio.gather(*(asyncio.to_thread(_pause, r.container) for r in runs))

    async def resume(self) -> None:
        self._paused = False
        runs = [r for r in self._running.values() if r.paused_at is not None]
        await asyncio.gather(*(asyncio.to_thread(_unpause, r.container) for r in runs))
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
            await asyncio.to_thread(_kill, run.container)
        self._cancel_requested.discard(task_id)
        self._images.pop(task_id, None)
        await self._remove_container(task_id)
        workspace = self._workspaces.pop(task_id, None)
        if workspace is not None:
            await asyncio.to_thread(rmtree, workspace)
        spec_file = self._spec_files.pop(task_id, None)
        if spec_file is not None:
            await asyncio.to_thread(spec_file.unlink, missing_ok=True)
        if self._image_budget > 0:
            await asyncio.to_thread(self.prune_images, self._image_budget)

    def prune_images(self, budget_bytes: int) -> list[str]:
        """Remove images this worker pulled or built, least recently used first, until they
        take at most `budget_bytes`; images of prepared tasks are kept. Returns the removed."""
        in_use = set(self._images.values())
        sizes: dict[str, int] = {}
        for ref in self._images_used.refs():
            try:
                sizes[ref] = int(self._client.images.get(ref).attrs.get("Size", 0))
            except docker.errors.ImageNotFound:
                self._images_used.forget(ref)
            except _DockerErrors as exc:
                log.debug("cannot size image %s: %s", ref, exc)
        total = sum(sizes.values())
        removed: list[str] = []
        for ref in self._images_used.refs():  # oldest first
            if total <= budget_bytes:
                break
            if ref in in_use or ref not in sizes:
                continue
            try:
                self._client.images.remove(ref)
            except _DockerErrors as exc:  # e.g. a container of someone else's uses it
                log.info("cannot prune image %s: %s", ref, _reason(exc))
                continue
            log.info("pruned image %s (%d MiB) to stay within the disk cap", ref, sizes[ref] >> 20)
            self._images_used.forget(ref)
            total -= sizes[ref]
            removed.append(ref)
        return removed

    async def _remove_container(self, task_id: str) -> None:
        container = self._containers.pop(task_id, None)
        if container is not None:
            await asyncio.to_thread(_remove, container)

    def usage(self) -> dict[str, Usage]:
        return {task_id: run.usage for task_id, run in self._running.items()}

    async def apply_caps(self, caps: Resources) -> None:
        """Scale running containers' CPU ceilings down to fit new caps (back up as they grow).

        CPU is the one limit Docker can change safely in flight; memory is left alone (a
        lower limit than a task holds would kill it) and the new caps bound new tasks.
        """
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
        except _DockerErrors as exc:  # it may have exited meanwhile
            log.debug("cannot update the CPU limit of %s: %s", container.short_id, exc)

    async def close(self) -> None:
        runs = list(self._running.values())
        for run in runs:
            if not run.timed_out:
                run.cancelled = True
        await asyncio.gather(*(asyncio.to_thread(_kill, r.container) for r in runs))


# -------------------------------------------------------------------- helpers


def _reason(exc: BaseException) -> str:
    """The engine's own words for a Docker error, without the HTTP wrapping."""
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def _state(container: Container) -> dict[str, Any]:
    container.reload()
    state: dict[str, Any] = container.attrs.get("State", {})
    return state


def _log_tail(container: Container, cap: int) -> bytes | None:
    """The last `cap` bytes of a stopped container's output, read as a stream."""
    tail = bytearray()
    try:
        for chunk in container.logs(stream=True, follow=False):
            tail += chunk
            if len(tail) > 2 * cap:
                del tail[: len(tail) - cap]
    except _DockerErrors as exc:
        log.debug("cannot read the output of %s: %s", container.short_id, exc)
        return None
    return bytes(tail[-cap:]) if cap else b""


def _docker_time(text: str) -> float:
    """Seconds since the epoch of a time the engine reports in UTC
    ('2026-11-30T21:58:03.123456789Z'); 0.0 for Go's zero time or anything else."""
    if not text.endswith("Z") or text.startswith("0001-"):
        return 0.0
    head, _, fraction = text[:-1].partition(".")
    try:
        stamp = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
        return stamp + (float(f"0.{fraction}") if fraction else 0.0)
    except ValueError:
        return 0.0


def _kill(container: Container) -> None:
    """SIGKILL the container; a frozen one is thawed so that the kill lands at once."""
    with contextlib.suppress(*_DockerErrors):
        container.kill()
    with contextlib.suppress(*_DockerErrors):
        container.unpause()


def _pause(container: Container) -> None:
    with contextlib.suppress(*_DockerErrors):  # it may have exited meanwhile
        container.pause()


def _unpause(container: Container) -> None:
    with contextlib.suppress(*_DockerErrors):
        container.unpause()


def _remove(container: Container) -> None:
    with contextlib.suppress(docker.errors.NotFound):
        try:
            container.remove(force=True, v=True)
        except _DockerErrors as exc:
            log.warning("cannot remove container %s: %s", container.short_id, _reason(exc))


class _ImageLedger:
    """Images this worker pulled or built and when each was last used, kept in a JSON file
    so that pruning never touches images the person pulled themselves."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}

    def _save(self, data: dict[str, float]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = self._path.with_suffix(".partial")
        partial.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        partial.replace(self._path)

    def touch(self, ref: str, *, only_known: bool = False) -> None:
        with self._lock:
            data = self._load()
            if only_known and ref not in data:
                return
            data[ref] = time.time()
            with contextlib.suppress(OSError):  # a lost entry only means no pruning of it
                self._save(data)

    def forget(self, ref: str) -> None:
        with self._lock:
            data = self._load()
            if data.pop(ref, None) is not None:
                with contextlib.suppress(OSError):
                    self._save(data)

    def refs(self) -> list[str]:
        """Known images, least recently used first."""
        with self._lock:
            data = self._load()
        return sorted(data, key=lambda ref: data[ref])


def _requirements_context(python_image: str, requirements: Iterable[str]) -> io.BytesIO:
    """A build context (tar) of a Dockerfile and the requirements file."""
    dockerfile = (
        f"FROM {python_image}\n"
        "USER root\n"
        "RUN mkdir -p /opt/hivemind-deps && chown 65534:65534 /opt/hivemind-deps\n"
        "COPY requirements.txt /opt/hivemind-requirements.txt\n"
        "USER 65534:65534\n"
        "ENV HOME=/tmp PYTHONPATH=/opt/hivemind-deps PATH=/opt/hivemind-deps/bin:$PATH\n"
        "RUN python3 -m pip install --no-cache-dir --disable-pip-version-check "
        "--no-warn-script-location --target /opt/hivemind-deps "
        "-r /opt/hivemind-requirements.txt\n"
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, text in (
            ("Dockerfile", dockerfile),
            ("requirements.txt", "".join(f"{line.strip()}\n" for line in requirements)),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def _chown_tree(root: Path, uid: int, gid: int) -> None:
    os.lchown(root, uid, gid)
    for folder, dirs, files in os.walk(root):
        for name in (*dirs, *files):
            os.lchown(os.path.join(folder, name), uid, gid)


def _start_thread(target: Callable[..., None], name: str, *args: object) -> threading.Thread:
    # Daemon threads: a stuck Docker stream must never keep the worker from exiting.
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def _in_thread(
    loop: asyncio.AbstractEventLoop, fn: Callable[[], T], name: str
) -> asyncio.Future[T]:
    """Run a long blocking call in its own thread (not the loop's small default pool)."""
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def target() -> None:
        try:
            value = fn()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, None)

    _start_thread(target, name)
    return future


# -------------------------------------------------------------------- courtesy


def courtesy_cgroup_parent(cgroup_driver: str, cgroup_version: str) -> tuple[str, str]:
    """A parent cgroup of minimal CPU weight for task containers, made when this process can.

    Returns (cgroup_parent, reason); an empty parent means containers sit under Docker's
    default parent with only their own low cpu_shares (and `reason` says why).
    With the cgroupfs driver and cgroup v1 the worker (as root) makes /hivemind under the
    cpu controller with cpu.shares=2; with cgroup v2 it makes /hivemind with cpu.weight=1.
    With the systemd driver the parent is hivemind.slice when the person has made it (systemd
    owns its weight; see docs/docker.md).
    """
    if not sys.platform.startswith("linux"):
        return "", "not Linux: Docker Desktop's VM has its own scheduler (see the docs)"
    if cgroup_driver == "systemd":
        # systemd owns the weights; the person makes the slice once (see docs/docker.md).
        for slice_dir in (
            Path("/sys/fs/cgroup/hivemind.slice"),
            Path("/sys/fs/cgroup/cpu/hivemind.slice"),
        ):
            if slice_dir.is_dir():
                return "hivemind.slice", f"hivemind.slice ({slice_dir})"
        return "", "systemd cgroup driver: create hivemind.slice with CPUWeight=1 (docs/docker.md)"
    if cgroup_driver != "cgroupfs":
        return "", f"cgroup driver {cgroup_driver or 'unknown'}"
    if str(cgroup_version) == "2":
        base = Path("/sys/fs/cgroup/hivemind")
        setting, value = "cpu.weight", "1"
    else:
        base = Path("/sys/fs/cgroup/cpu/hivemind")
        setting, value = "cpu.shares", "2"
    try:
        base.mkdir(exist_ok=True)
        (base / setting).write_text(value)
    except OSError as exc:
        return "", f"cannot make {base}: {exc.strerror or exc}"
    return "/hivemind", f"{base} with {setting}={value}"
