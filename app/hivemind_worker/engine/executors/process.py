"""ProcessExecutor: python tasks as local subprocesses with rlimits, the fallback without Docker."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import logging
import math
import os
import shutil
import signal
import stat
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import BinaryIO

import psutil

from hivemind_worker.engine.executors import limits as plimits
from hivemind_worker.engine.executors.base import Executor, ExecutorError, LogSink, Usage
from hivemind_worker.engine.tasks import (
    MAX_INPUT_BYTES,
    MiB,
    Resources,
    TaskKind,
    TaskResult,
    TaskSpec,
    TaskSpecError,
    TaskStatus,
    safe_relative_path,
)

log = logging.getLogger(__name__)

# RLIMIT_AS caps address space, not resident memory, so the task gets its memory cap plus a
# fixed allowance for what an interpreter maps without using. Measured on Linux x86-64 with
# CPython 3.11: a bare `python -I` maps ~12 MiB and starts under a 16 MiB limit; each thread
# adds an 8 MiB stack; `import numpy` with OpenBLAS (2 cores) maps ~140 MiB while ~30 MiB is
# resident, and fails outright under 128 MiB. 256 MiB keeps such ordinary programs working;
# the price is that a task may hold up to cap + 256 MiB resident before it hits the limit.
ADDRESS_SPACE_ALLOWANCE = 256 * MiB
# RLIMIT_CPU is only a backstop (the wall-clock timeout is the real limit).
CPU_LIMIT_SLACK_SECONDS = 5
TERM_GRACE_SECONDS = 2.0
SAMPLE_INTERVAL = 1.0
POLL_INTERVAL = 0.1
EXIT_POLL_INTERVAL = 0.005
DRAIN_SECONDS = 5.0
READ_CHUNK = 64 * 1024
MAX_ARCHIVE_MEMBERS = 10_000
MAX_ARCHIVE_BYTES = MAX_INPUT_BYTES
MAX_RESULT_DEPTH = 100
ARCHIVES_DIR = "_archives"
TMP_DIR = "tmp"
# A failed allocation shows up at the end of the output: a Python traceback ending in
# MemoryError, or a C++ library's bad_alloc. Only the end is looked at, so a task that
# caught a MemoryError earlier and failed later for another reason is not called OOM.
_OOM_MARKERS = (b"MemoryError", b"std::bad_alloc")
_OOM_SCAN_BYTES = 4096

_O_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_O_DIRECTORY = getattr(os, "O_DIRECTORY", 0)
_O_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
_O_NONBLOCK = getattr(os, "O_NONBLOCK", 0)
_DIR_FLAGS = os.O_RDONLY | _O_DIRECTORY | _O_NOFOLLOW | _O_CLOEXEC


class _ResultError(Exception):
    """The results folder holds something the worker will not send back."""


@dataclass(eq=False)
class _Running:
    task: TaskSpec
    proc: asyncio.subprocess.Process
    started: float  # time.monotonic()
    leader: psutil.Process | None = None
    paused_at: float | None = None
    paused_total: float = 0.0
    cancelled: bool = False
    timed_out: bool = False
    # Every process seen in the task's tree, so that one which left the process group
    # (setsid) is still paused, resumed and killed with it. Touched from sampling threads.
    known: set[psutil.Process] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    usage: Usage = field(default_factory=Usage)
    cpu_seconds: float = 0.0
    max_rss: int = 0
    last_sample: float = 0.0  # when the supervisor last asked for a sample
    sampled_at: float = 0.0  # when the last sample was taken, for cpu_percent
    tail: bytearray = field(default_factory=bytearray)
    output_bytes: int = 0

    def active_seconds(self, now: float) -> float:
        """Wall-clock seconds the task has run, not counting time spent paused."""
        paused = self.paused_total
        if self.paused_at is not None:
            paused += now - self.paused_at
        return now - self.started - paused


class ProcessExecutor(Executor):
    """Runs TaskKind.PYTHON tasks as `python -E -s main.py *argv` in a private workspace.

    Lower trust than Docker: the task runs as the worker's user, with a scrubbed
    environment, its own session and process group, rlimits (address space = memory cap
    + 256 MiB, CPU time backstop, file size = disk cap, no core dumps) and nice 10.
    Nothing stops it from reading files that user can read, and cpus are not enforced
    beyond the nice value and the CPU-time backstop.

    Workspace: `work_dir/<task_id>-<lease_id or 'nolease'>` (0700), holding main.py, the
    inputs, `tmp/` (TMPDIR, HOME is the workspace) and the results folder.

    Results: once the task has ended (any status but CANCELLED) the results folder is packed
    into `work_dir/_archives/<task_id>-<lease_id>.tar.gz`, owned by the engine from then on.
    Names in it are relative and start with the task's result_path ("results/..."), with an
    entry for the folder itself, so an empty results folder gives a valid archive holding
    only "results/"; a results folder the task deleted gives an archive with no entries.
    `archive` is None only for a cancelled task or when the results could not be collected:
    a symlink, device, fifo or socket, or more than `max_result_files` entries or
    `task.max_result_bytes` bytes, makes a task that had succeeded FAILED with an error
    naming the entry (a task that had already failed keeps its status; the reason is
    appended to its error).

    Status: exit 0 is SUCCEEDED; a non-zero exit whose output ends in a MemoryError (or
    std::bad_alloc) traceback is OUT_OF_MEMORY; other non-zero exits are FAILED with
    "exited with code N" or "killed by signal SIGX". `exit_code` is the exit status, or
    128 + the signal number when a signal ended it, as shells and Docker report it.

    Usage (`usage()`, cpu_seconds, max_memory_bytes) is sampled with psutil at 1 Hz over the
    task's process tree: the CPU time of the last second before exit, and of processes that
    end between samples without being reaped inside the task, is missed; max memory is the
    largest summed RSS seen in a sample.
    """

    capability = "process"

    def __init__(
        self,
        work_dir: Path,
        *,
        python: str | None = None,
        log_tail_bytes: int = 64 * 1024,
        max_result_files: int = 10_000,
    ) -> None:
        self._work_dir = Path(work_dir)
        self._python = python or _default_python()
        self._log_tail_bytes = max(int(log_tail_bytes), 0)
        self._max_result_files = max_result_files
        self._workspaces: dict[str, Path] = {}
        self._running: dict[str, _Running] = {}
        self._cancel_requested: set[str] = set()
        self._paused = False

    @property
    def python(self) -> str:
        """The interpreter that runs tasks."""
        return self._python

    @property
    def archive_dir(self) -> Path:
        """Where result archives are written (the engine deletes them)."""
        return self._work_dir / ARCHIVES_DIR

    def workspace(self, task_id: str) -> Path | None:
        """The workspace of a prepared task, until cleanup."""
        return self._workspaces.get(task_id)

    # ---------------------------------------------------------------- prepare

    async def prepare(self, task: TaskSpec) -> None:
        if task.kind is not TaskKind.PYTHON:
            raise ExecutorError("container tasks need Docker; this worker runs without it")
        if task.requirements:
            raise ExecutorError(
                "tasks with pip requirements need Docker; this worker runs without it"
            )
        if not plimits.supported():
            # Windows needs a Job Object for memory and CPU limits; until it has one, refuse
            # rather than run a task without the limits it was promised.
            raise ExecutorError(plimits.unsupported_reason())
        if task.task_id in self._running:
            raise ExecutorError(f"task {task.task_id} is already running")
        workspace = self._work_dir / f"{task.task_id}-{task.lease_id or 'nolease'}"
        previous = self._workspaces.get(task.task_id)
        if previous is not None and previous != workspace:
            # Prepared again under a new lease without a cleanup in between.
            await asyncio.to_thread(_rmtree, previous)
        self._workspaces[task.task_id] = workspace
        self._cancel_requested.discard(task.task_id)
        try:
            await asyncio.to_thread(self._prepare_sync, task, workspace)
        except BaseException:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(_rmtree, workspace)
            raise

    def _prepare_sync(self, task: TaskSpec, workspace: Path) -> None:
        try:
            self._work_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            if workspace.exists() or workspace.is_symlink():
                _rmtree(workspace)
            os.mkdir(workspace, 0o700)
        except OSError as exc:
            raise ExecutorError(f"cannot create the task workspace {workspace}: {exc}") from exc
        root = os.open(workspace, _DIR_FLAGS)
        try:
            if task.input_archive:
                _unpack_archive(task.input_archive, workspace)
            for f in task.input_files:
                _write_file(
                    root, workspace, str(f.path), f.content, mode=f.mode, field_name="input_files"
                )
            _write_file(
                root, workspace, "main.py", task.source.encode(), mode=0o644, field_name="source"
            )
            _make_dirs(root, workspace, str(task.result_path), "result_path")
            _make_dirs(root, workspace, TMP_DIR, "input_files")
        except OSError as exc:
            raise ExecutorError(f"cannot write the task inputs: {exc}") from exc
        finally:
            os.close(root)

    # ---------------------------------------------------------------- run

    async def run(
        self, task: TaskSpec, caps: Resources, on_log: LogSink | None = None
    ) -> TaskResult:
        workspace = self._workspaces.get(task.task_id)
        if workspace is None:
            raise ExecutorError(f"task {task.task_id} was not prepared")
        result = TaskResult(task.task_id, task.lease_id, TaskStatus.FAILED, started_at=time.time())
        if task.task_id in self._cancel_requested:
            result.status = TaskStatus.CANCELLED
            result.error = "cancelled before it started"
            result.finished_at = time.time()
            return result
        try:
            await self._run(task, caps, on_log, workspace, result)
        except Exception as exc:  # run() never raises for what a task does
            log.exception("process executor failed on task %s", task.task_id)
            result.status = TaskStatus.FAILED
            result.error = f"worker error while running the task: {exc}"
            result.archive = None
        if not result.finished_at:
            result.finished_at = time.time()
        return result

    async def _run(
        self,
        task: TaskSpec,
        caps: Resources,
        on_log: LogSink | None,
        workspace: Path,
        result: TaskResult,
    ) -> None:
        results_dir = workspace / Path(*task.result_path.parts)
        memory = caps.memory_bytes if caps.memory_bytes > 0 else task.resources.memory_bytes
        disk = caps.disk_bytes if caps.disk_bytes > 0 else task.resources.disk_bytes
        cpus = caps.cpus if caps.cpus > 0 else task.resources.cpus
        limits = plimits.ProcessLimits(
            address_space_bytes=memory + ADDRESS_SPACE_ALLOWANCE,
            cpu_seconds=task.timeout_seconds * max(1, math.ceil(cpus)) + CPU_LIMIT_SLACK_SECONDS,
            # Per file, not per workspace: a backstop against filling the disk in one write.
            file_size_bytes=disk,
        )
        try:
            proc = await asyncio.create_subprocess_exec(
                *plimits.launch_argv(self._python, limits, "main.py", task.argv),
                cwd=workspace,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=_task_environment(task, workspace, results_dir),
                limit=READ_CHUNK,
            )
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            result.error = f"could not start the task: {exc}"
            return
        run = _Running(task, proc, started=time.monotonic())
        # Registered before any await, so a pause() from here on reaches this task.
        self._running[task.task_id] = run
        if self._paused:
            run.paused_at = run.started
            self._signal(run, signal.SIGSTOP)
        reader = asyncio.create_task(self._pump(run, on_log))
        try:
            run.leader = await asyncio.to_thread(_psutil_process, proc.pid)
            await self._supervise(run, reader)
        finally:
            # However the run ends (exit, timeout, cancel, or this coroutine being cancelled),
            # nothing the task started may outlive it.
            self._signal(run, signal.SIGKILL)
            self._running.pop(task.task_id, None)
            await self._drain(run, reader)

        rc = proc.returncode if proc.returncode is not None else -signal.SIGKILL
        result.finished_at = time.time()
        result.exit_code = 128 - rc if rc < 0 else rc
        result.log_tail = bytes(run.tail)
        result.cpu_seconds = run.cpu_seconds
        result.max_memory_bytes = run.max_rss
        if run.cancelled:
            result.status = TaskStatus.CANCELLED
            result.error = "cancelled"
        elif run.timed_out:
            result.status = TaskStatus.TIMED_OUT
            result.error = f"killed after {task.timeout_seconds} s timeout"
        elif rc == 0:
            result.status = TaskStatus.SUCCEEDED
        elif any(m in run.tail[-_OOM_SCAN_BYTES:] for m in _OOM_MARKERS):
            result.status = TaskStatus.OUT_OF_MEMORY
            result.error = f"ran out of memory (limit {memory // MiB} MiB)"
        elif rc < 0:
            result.error = f"killed by signal {_signal_name(-rc)}"
        else:
            result.error = f"exited with code {rc}"
        if result.status is TaskStatus.CANCELLED:
            return
        try:
            archive, digest, size = await asyncio.to_thread(self._collect, task, workspace)
        except (_ResultError, OSError) as exc:
            reason = str(exc) if isinstance(exc, _ResultError) else f"cannot pack results: {exc}"
            if result.status is TaskStatus.SUCCEEDED:
                result.status = TaskStatus.FAILED
                result.error = reason
            else:
                result.error = f"{result.error}; results not collected: {reason}"
            return
        result.archive, result.archive_sha256, result.archive_size = archive, digest, size

    async def _supervise(self, run: _Running, reader: asyncio.Task[None]) -> None:
        # asyncio's Process.wait() only returns once the stdout pipe is closed too, which a
        # grandchild holding it can delay forever; returncode is set at the exit itself.
        # The end of output usually comes with the exit, so it cuts the polling short.
        proc = run.proc
        timeout = run.task.timeout_seconds
        while proc.returncode is None:
            now = time.monotonic()
            if now - run.last_sample >= SAMPLE_INTERVAL:
                run.last_sample = now
                await asyncio.to_thread(_sample, run)
                continue
            if not run.cancelled and run.paused_at is None and run.active_seconds(now) >= timeout:
                run.timed_out = True
                await self._terminate(run)
                return
            if reader.done():
                await asyncio.sleep(EXIT_POLL_INTERVAL)  # output closed: the exit is near
            else:
                await asyncio.wait({reader}, timeout=POLL_INTERVAL)
        await asyncio.to_thread(_sample, run)

    async def _terminate(self, run: _Running) -> None:
        """SIGTERM the task, give it a short grace to finish writing, then SIGKILL."""
        self._signal(run, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_SECONDS
        # Polled: no event fires at the exit itself (see _supervise).
        while run.proc.returncode is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(POLL_INTERVAL)
        self._signal(run, signal.SIGKILL)

    async def _pump(self, run: _Running, on_log: LogSink | None) -> None:
        stream = run.proc.stdout
        if stream is None:
            return
        cap = self._log_tail_bytes
        task_id = run.task.task_id
        while True:
            chunk = await stream.read(READ_CHUNK)
            if not chunk:
                return
            run.output_bytes += len(chunk)
            # Only the tail is kept: a task printing gigabytes must not grow the worker.
            run.tail += chunk
            if len(run.tail) > cap:
                del run.tail[: len(run.tail) - cap]
            if on_log is not None:
                try:
                    on_log(task_id, chunk)
                except Exception:
                    log.exception("log sink failed for task %s; no more output is sent", task_id)
                    on_log = None

    async def _drain(self, run: _Running, reader: asyncio.Task[None]) -> None:
        """Wait (bounded) for the killed task's pipe to close and its output to be read."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(run.proc.wait(), DRAIN_SECONDS)
        _, pending = await asyncio.wait({reader}, timeout=DRAIN_SECONDS)
        if pending:
            # Something outside the task's tree holds the pipe open; stop reading it.
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        elif not reader.cancelled() and reader.exception() is not None:
            log.warning(
                "reading output of task %s failed: %s", run.task.task_id, reader.exception()
            )

    def _signal(self, run: _Running, sig: int) -> None:
        # Plain syscalls (kill, and a /proc read per known process to guard against pid
        # reuse): microseconds each, so done inline on the loop.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # After the leader is reaped its pid stays the group id while any member lives
            # (Linux never reuses a pid still in use as a process group id).
            os.killpg(run.proc.pid, sig)
        with run.lock:
            known = list(run.known)
        for p in known:
            with contextlib.suppress(psutil.Error, OSError):
                p.send_signal(sig)

    # ---------------------------------------------------------------- results

    def _collect(self, task: TaskSpec, workspace: Path) -> tuple[Path, str, int]:
        archive_dir = self.archive_dir
        archive_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        archive = archive_dir / f"{task.task_id}-{task.lease_id or 'nolease'}.tar.gz"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(archive)
        fd = os.open(
            archive, os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC, 0o600
        )
        try:
            with (
                os.fdopen(fd, "wb") as raw,
                tarfile.open(fileobj=raw, mode="w:gz", format=tarfile.PAX_FORMAT) as tar,
            ):
                walker = _ResultWalker(tar, task.max_result_bytes, self._max_result_files)
                walker.pack(workspace, task.result_path)
            digest = hashlib.sha256()
            with open(archive, "rb") as f:
                while block := f.read(1024 * 1024):
                    digest.update(block)
            return archive, digest.hexdigest(), archive.stat().st_size
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(archive)
            raise

    # ---------------------------------------------------------------- control

    async def cancel(self, task_id: str) -> None:
        run = self._running.get(task_id)
        if run is None:
            if task_id in self._workspaces:
                self._cancel_requested.add(task_id)
            return
        if not run.timed_out:
            run.cancelled = True
        self._signal(run, signal.SIGKILL)

    async def pause(self) -> None:
        self._paused = True
        now = time.monotonic()
        for run in list(self._running.values()):
            if run.paused_at is None:
                run.paused_at = now
                self._signal(run, signal.SIGSTOP)

    async def resume(self) -> None:
        self._paused = False
        now = time.monotonic()
        for run in list(self._running.values()):
            if run.paused_at is not None:
                # The paused time is not counted against the task's timeout.
                run.paused_total += now - run.paused_at
                run.paused_at = None
                self._signal(run, signal.SIGCONT)

    async def cleanup(self, task_id: str) -> None:
        run = self._running.get(task_id)
        if run is not None:
            if not run.timed_out:
                run.cancelled = True
            self._signal(run, signal.SIGKILL)
        self._cancel_requested.discard(task_id)
        workspace = self._workspaces.pop(task_id, None)
        if workspace is not None:
            await asyncio.to_thread(_rmtree, workspace)

    def usage(self) -> dict[str, Usage]:
        return {task_id: run.usage for task_id, run in self._running.items()}

    async def close(self) -> None:
        for run in list(self._running.values()):
            if not run.timed_out:
                run.cancelled = True
            self._signal(run, signal.SIGKILL)


# -------------------------------------------------------------------- helpers


def _default_python() -> str:
    if getattr(sys, "frozen", False):
        # A frozen worker's sys.executable is the worker itself, not an interpreter.
        found = shutil.which("python3") or shutil.which("python")
        if not found:
            raise ExecutorError(
                "no Python interpreter was found (python3 on PATH) to run python tasks "
                "without Docker"
            )
        return found
    if not sys.executable:
        raise ExecutorError("no Python interpreter was found to run python tasks")
    return sys.executable


def _task_environment(task: TaskSpec, workspace: Path, results_dir: Path) -> dict[str, str]:
    """A minimal environment: nothing is inherited from the worker, which may hold secrets."""
    env = {
        "PATH": os.defpath,
        "HOME": str(workspace),
        "TMPDIR": str(workspace / TMP_DIR),
        "LANG": "C.UTF-8",
        # `-E` makes the task's own interpreter ignore PYTHON* variables; this one reaches
        # the Python processes the task starts without -I/-E.
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    for name, value in task.env.items():
        if name == "PATH" or name.startswith("HIVEMIND_"):
            continue  # the worker's values win
        env[name] = value
    env["HIVEMIND_TASK_ID"] = task.task_id
    env["HIVEMIND_RESULTS_DIR"] = str(results_dir.absolute())
    return env


def _psutil_process(pid: int) -> psutil.Process | None:
    try:
        return psutil.Process(pid)
    except psutil.Error:
        return None


def _sample(run: _Running) -> None:
    """One usage sample of the task's process tree (runs in a thread; reads /proc)."""
    tree: list[psutil.Process] = []
    leader = run.leader
    if leader is not None:
        with contextlib.suppress(psutil.Error):
            tree.append(leader)
            tree.extend(leader.children(recursive=True))
    with run.lock:
        run.known.update(tree)
        candidates = list(run.known)
    rss = 0
    cpu = 0.0
    gone: list[psutil.Process] = []
    for p in candidates:
        try:
            with p.oneshot():
                if p.status() == psutil.STATUS_ZOMBIE:
                    gone.append(p)
                    continue
                rss += p.memory_info().rss
                t = p.cpu_times()
                # children_* hold the children this process has reaped; live children are
                # counted on their own, so nothing is counted twice.
                cpu += t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            gone.append(p)
    if gone:
        with run.lock:
            run.known.difference_update(gone)
    now = time.monotonic()
    previous_cpu = run.cpu_seconds
    previous_at = run.sampled_at
    run.cpu_seconds = max(run.cpu_seconds, cpu)
    run.max_rss = max(run.max_rss, rss)
    elapsed = now - previous_at
    percent = (run.cpu_seconds - previous_cpu) / elapsed * 100 if previous_at and elapsed else 0.0
    run.usage = Usage(cpu_percent=percent, memory_bytes=rss, cpu_seconds=run.cpu_seconds)
    run.sampled_at = now


def _signal_name(number: int) -> str:
    try:
        name = signal.Signals(number).name
    except ValueError:
        return str(number)
    hint = {"SIGXCPU": " (CPU time limit)", "SIGXFSZ": " (file size limit)"}.get(name, "")
    return name + hint


def _check_inside(workspace: Path, rel: str, field_name: str) -> PurePosixPath:
    """Validate `rel` again (a TaskSpec may be built without from_proto) and resolve it."""
    path = safe_relative_path(rel, field_name)
    target = (workspace / Path(*path.parts)).resolve()
    if not target.is_relative_to(workspace.resolve()):
        raise TaskSpecError(field_name, f"{rel!r} resolves outside the workspace")
    return path


def _open_parent(root: int, path: PurePosixPath, field_name: str) -> int:
    """An fd of `path`'s parent folder, made as needed, never following a symlink."""
    fd = os.dup(root)
    try:
        for part in path.parts[:-1]:
            with contextlib.suppress(FileExistsError):
                os.mkdir(part, 0o755, dir_fd=fd)
            try:
                child = os.open(part, _DIR_FLAGS, dir_fd=fd)
            except OSError as exc:
                raise TaskSpecError(
                    field_name, f"{str(path)!r}: {part!r} is not a folder ({exc.strerror})"
                ) from exc
            os.close(fd)
            fd = child
    except BaseException:
        os.close(fd)
        raise
    return fd


def _write_file(
    root: int, workspace: Path, rel: str, content: bytes, *, mode: int, field_name: str
) -> None:
    path = _check_inside(workspace, rel, field_name)
    parent = _open_parent(root, path, field_name)
    try:
        try:
            fd = os.open(
                path.name,
                os.O_WRONLY | os.O_CREAT | os.O_EXCL | _O_NOFOLLOW | _O_CLOEXEC,
                0o600,
                dir_fd=parent,
            )
        except FileExistsError:
            raise TaskSpecError(
                field_name, f"{rel!r} is given twice (inline, in the archive, or as main.py)"
            ) from None
        with os.fdopen(fd, "wb") as f:
            f.write(content)
            os.fchmod(f.fileno(), mode & 0o777)
    finally:
        os.close(parent)


def _make_dirs(root: int, workspace: Path, rel: str, field_name: str) -> None:
    path = _check_inside(workspace, rel, field_name)
    parent = _open_parent(root, path, field_name)
    try:
        with contextlib.suppress(FileExistsError):
            os.mkdir(path.name, 0o755, dir_fd=parent)
        st = os.stat(path.name, dir_fd=parent, follow_symlinks=False)
        if not stat.S_ISDIR(st.st_mode):
            raise TaskSpecError(field_name, f"{rel!r} exists and is not a folder")
    finally:
        os.close(parent)


def _unpack_archive(data: bytes, workspace: Path) -> None:
    """Unpack a tar (gzip allowed) of regular files and folders only, within the caps."""
    field_name = "input_archive"
    try:
        with tarfile.open(fileobj=io.BytesIO(data), mode="r:*") as tar:
            members: list[tarfile.TarInfo] = []
            files: set[str] = set()
            total = 0
            for member in tar:
                if len(members) >= MAX_ARCHIVE_MEMBERS:
                    raise TaskSpecError(field_name, f"more than {MAX_ARCHIVE_MEMBERS} entries")
                raw = member.name
                if member.issym() or member.islnk():
                    raise TaskSpecError(
                        field_name, f"{raw!r} is a link; only files and folders are allowed"
                    )
                if member.issparse() or not (member.isreg() or member.isdir()):
                    raise TaskSpecError(
                        field_name,
                        f"{raw!r} is a device, fifo or other special entry; "
                        "only files and folders are allowed",
                    )
                name = raw
                while name.startswith("./"):
                    name = name[2:]
                name = name.rstrip("/") if member.isdir() else name
                if name in ("", ".") and member.isdir():
                    continue  # the archive's own root, as `tar -C dir .` writes it
                rel = str(safe_relative_path(name, field_name))
                if member.isreg():
                    if rel in files:
                        raise TaskSpecError(field_name, f"{raw!r} appears twice")
                    files.add(rel)
                total += member.size
                if total > MAX_ARCHIVE_BYTES:
                    raise TaskSpecError(
                        field_name, f"unpacks to more than {MAX_ARCHIVE_BYTES} bytes"
                    )
                member.name = rel
                members.append(member)
            tar.extractall(workspace, members=members, filter="data")
    except tarfile.TarError as exc:
        raise TaskSpecError(field_name, f"cannot unpack: {exc}") from exc
    except (OSError, EOFError) as exc:
        raise TaskSpecError(field_name, f"cannot unpack: {exc}") from exc


class _ResultWalker:
    """Packs a results folder into a tar, entry by entry, never following a symlink."""

    def __init__(self, tar: tarfile.TarFile, max_bytes: int, max_entries: int) -> None:
        self._tar = tar
        self._max_bytes = max_bytes
        self._max_entries = max_entries
        self._bytes = 0
        self._entries = 0

    def pack(self, workspace: Path, result_path: PurePosixPath) -> None:
        fd = os.open(workspace, _DIR_FLAGS)
        try:
            for i, part in enumerate(result_path.parts):
                name = PurePosixPath(*result_path.parts[: i + 1])
                try:
                    st = os.stat(part, dir_fd=fd, follow_symlinks=False)
                except FileNotFoundError:
                    return  # the task removed its results folder: an archive with no entries
                if i == len(result_path.parts) - 1:
                    child = self._open_dir(fd, part, name, st)
                    os.close(fd)
                    fd = child
                    self._add_dir(name, os.fstat(fd))
                    self._walk(fd, name, 1)
                else:
                    child = self._open_dir(fd, part, name, st)
                    os.close(fd)
                    fd = child
        finally:
            os.close(fd)

    def _open_dir(self, parent: int, part: str, name: PurePosixPath, st: os.stat_result) -> int:
        if not stat.S_ISDIR(st.st_mode):
            raise _ResultError(f"{name} is {_kind(st.st_mode)}, not a folder")
        try:
            return os.open(part, _DIR_FLAGS, dir_fd=parent)
        except OSError as exc:
            raise _ResultError(f"{name} cannot be opened as a folder: {exc.strerror}") from exc

    def _count(self, name: PurePosixPath) -> None:
        self._entries += 1
        if self._entries > self._max_entries:
            raise _ResultError(
                f"results hold more than {self._max_entries} files and folders (at {name})"
            )

    def _add_dir(self, name: PurePosixPath, st: os.stat_result) -> None:
        self._count(name)
        info = tarfile.TarInfo(str(name))
        info.type = tarfile.DIRTYPE
        info.mode = 0o755
        info.mtime = int(st.st_mtime)
        self._tar.addfile(info)

    def _walk(self, dir_fd: int, prefix: PurePosixPath, depth: int) -> None:
        if depth > MAX_RESULT_DEPTH:
            raise _ResultError(f"results are nested more than {MAX_RESULT_DEPTH} folders deep")
        with os.scandir(dir_fd) as it:
            names = sorted(entry.name for entry in it)
        for entry_name in names:
            name = prefix / entry_name
            try:
                st = os.stat(entry_name, dir_fd=dir_fd, follow_symlinks=False)
            except FileNotFoundError:
                continue  # removed since the listing (by nothing of the task's: it is dead)
            if stat.S_ISDIR(st.st_mode):
                child = self._open_dir(dir_fd, entry_name, name, st)
                try:
                    self._add_dir(name, os.fstat(child))
                    self._walk(child, name, depth + 1)
                finally:
                    os.close(child)
            elif stat.S_ISREG(st.st_mode):
                self._add_file(dir_fd, entry_name, name)
            else:
                raise _ResultError(
                    f"{name} is {_kind(st.st_mode)}; results may hold only regular files "
                    "and folders"
                )

    def _add_file(self, dir_fd: int, entry_name: str, name: PurePosixPath) -> None:
        self._count(name)
        try:
            fd = os.open(
                entry_name, os.O_RDONLY | _O_NOFOLLOW | _O_NONBLOCK | _O_CLOEXEC, dir_fd=dir_fd
            )
        except OSError as exc:
            raise _ResultError(f"{name} cannot be read: {exc.strerror}") from exc
        with os.fdopen(fd, "rb") as f:
            st = os.fstat(f.fileno())
            if not stat.S_ISREG(st.st_mode):
                raise _ResultError(f"{name} is {_kind(st.st_mode)}, not a regular file")
            self._bytes += st.st_size
            if self._bytes > self._max_bytes:
                raise _ResultError(
                    f"results are larger than the task's limit of {self._max_bytes} bytes "
                    f"(at {name})"
                )
            info = tarfile.TarInfo(str(name))
            info.size = st.st_size
            info.mode = 0o755 if st.st_mode & 0o111 else 0o644
            info.mtime = int(st.st_mtime)
            _add_fileobj(self._tar, info, f)


def _add_fileobj(tar: tarfile.TarFile, info: tarfile.TarInfo, f: BinaryIO) -> None:
    try:
        tar.addfile(info, f)
    except OSError as exc:  # e.g. the file shrank while being read
        raise _ResultError(f"{info.name} cannot be read: {exc}") from exc


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISFIFO(mode):
        return "a fifo"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISREG(mode):
        return "a regular file"
    return "a special file"


def _rmtree(path: Path) -> None:
    """Remove a workspace; read-only files and folders are made writable and retried."""

    def retry(func: Callable[..., object], name: str, exc: BaseException) -> None:
        if isinstance(exc, FileNotFoundError):
            return
        with contextlib.suppress(OSError):
            parent = os.path.dirname(name)
            if stat.S_ISDIR(os.lstat(parent).st_mode):
                os.chmod(parent, 0o700)
        try:
            st = os.lstat(name)
        except FileNotFoundError:
            return
        if stat.S_ISDIR(st.st_mode):  # lstat: never chmod through a symlink
            os.chmod(name, 0o700)
            shutil.rmtree(name)
        else:
            os.unlink(name)

    if not (path.exists() or path.is_symlink()):
        return
    if path.is_symlink():
        path.unlink()
        return
    if sys.version_info >= (3, 12):
        shutil.rmtree(path, onexc=retry)
    else:
        shutil.rmtree(path, onerror=lambda func, name, info: retry(func, name, info[1]))
