"""ProcessExecutor: python tasks as local subprocesses with rlimits, the fallback without Docker."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import psutil

from hivemind_worker.engine.aio import wait_at_most
from hivemind_worker.engine.executors import cgroups, launcher, sandbox_linux, windows_job
from hivemind_worker.engine.executors import limits as plimits
from hivemind_worker.engine.executors.base import (
    Executor,
    ExecutorError,
    LogSink,
    Usage,
    collect_results,
    settle_status,
)
from hivemind_worker.engine.executors.freeze import TreeControl
from hivemind_worker.engine.executors.process_run import (
    SAMPLE_INTERVAL,
    Running,
    default_python,
    exit_error,
    psutil_process,
    sample,
    task_environment,
)
from hivemind_worker.engine.executors.workspace import (
    ARCHIVES_DIR,
    discard,
    pack_results,
    prepare_workspace,
    rmtree,
    workspace_path,
)
from hivemind_worker.engine.runners import EXTRA_ADDRESS_SPACE
from hivemind_worker.engine.runners.environments import Environments
from hivemind_worker.tasks import (
    MiB,
    Resources,
    TaskKind,
    TaskResult,
    TaskSpec,
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
POLL_INTERVAL = 0.1
EXIT_POLL_INTERVAL = 0.005
DRAIN_SECONDS = 5.0
READ_CHUNK = 64 * 1024
# A failed allocation shows up at the end of the output: a Python traceback ending in
# MemoryError, or a C++ library's bad_alloc. Only the end is looked at, so a task that
# caught a MemoryError earlier and failed later for another reason is not called OOM.
_OOM_MARKERS = (b"MemoryError", b"std::bad_alloc")
_OOM_SCAN_BYTES = 4096
# Windows has no such signals; there they stand for the Job Object's terminate, and for
# suspending and resuming the task's processes (_signal).
SIGKILL = getattr(signal, "SIGKILL", 9)
SIGSTOP = getattr(signal, "SIGSTOP", 19)
SIGCONT = getattr(signal, "SIGCONT", 18)
# The private /tmp (a tmpfs, so memory) is capped like the Docker executor's.
TMPFS_MAX_BYTES = 256 * MiB


class ProcessExecutor(Executor):
    """Runs TaskKind.PYTHON tasks as `python -E -s main.py *argv` in a private workspace.

    Walls on Linux (launcher.py builds them; sandbox_linux.probe() says which this machine
    gives, and a task is refused rather than run behind none): user, PID, network, IPC and
    UTS namespaces; a minimal read-only root holding /usr, the /etc essentials, a fresh
    /proc, a few devices, a private size-capped /tmp and the workspace at /workspace, and
    nothing else; no capabilities; Landlock (writes only in /workspace and /tmp); a seccomp
    filter; RLIMIT_NPROC counted per namespace (a cap on the whole tree); rlimits per process
    (address space = memory cap + 256 MiB, CPU time backstop, file size = disk cap, no core
    dumps); nice 10; a scrubbed environment. When the worker runs as root, tasks run as
    nobody. The workspace is watched: past the disk cap the task is killed and FAILED
    ("used more than its N MiB disk limit").

    Workspace: `work_dir/<task_id>-<lease_id or 'nolease'>` (0700), holding main.py, the
    inputs, `tmp/` and the results folder; the task sees it as /workspace (its cwd), with
    HOME and TMPDIR /tmp, as in the Docker executor.

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
        environments: Environments | None = None,
    ) -> None:
        self._work_dir = Path(work_dir)
        self._python = python or default_python()
        # Tasks with requirements (the ml and data runners among them) run with the
        # interpreter of a read-only virtualenv built once per requirement set.
        self._environments = environments
        self.runs_runners = environments is not None
        self._task_python: dict[str, str] = {}
        self._log_tail_bytes = max(int(log_tail_bytes), 0)
        self._max_result_files = max_result_files
        self._workspaces: dict[str, Path] = {}
        self._running: dict[str, Running] = {}
        self._cancel_requested: set[str] = set()
        self._paused = False
        self._confinement: sandbox_linux.Confinement | None = None
        self._cgroups: cgroups.Cgroups | None = None
        self._cpu_cap = 0.0  # the person's CPU cap as last applied; 0: not applied yet

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

    async def tree_limiter(self) -> cgroups.Cgroups | None:
        """How a task's whole tree is limited here (probed once); None off Linux."""
        if not sys.platform.startswith("linux"):
            return None
        if self._cgroups is None:
            self._cgroups = await asyncio.to_thread(cgroups.probe)
            log.info("process sandbox limits for the task tree: %s", self._cgroups.reason)
        return self._cgroups

    async def confinement(self) -> sandbox_linux.Confinement | None:
        """The walls tasks get on this machine (probed once, by a real launch); None off Linux."""
        if not sys.platform.startswith("linux"):
            return None
        if self._confinement is None:
            self._confinement = await asyncio.to_thread(sandbox_linux.probe, self._python)
            log.info("%s", self._confinement.summary())
            if self._confinement.run_as:
                log.warning(
                    "the worker runs as root: tasks run as uid %d instead; run the worker as "
                    "an ordinary user",
                    self._confinement.run_as[0],
                )
        return self._confinement

    # ---------------------------------------------------------------- prepare

    async def prepare(self, task: TaskSpec) -> None:
        if task.kind is not TaskKind.PYTHON:
            raise ExecutorError("container tasks need Docker; this worker runs without it")
        if task.requirements and self._environments is None:
            raise ExecutorError(
                "tasks with pip requirements need Docker; this worker runs without it"
            )
        if not plimits.supported():
            # Windows needs a Job Object for memory and CPU limits; until it has one, refuse
            # rather than run a task without the limits it was promised.
            raise ExecutorError(plimits.unsupported_reason())
        confinement = await self.confinement()
        if confinement is not None and not confinement.usable:
            raise ExecutorError(confinement.problem)
        if task.task_id in self._running:
            raise ExecutorError(f"task {task.task_id} is already running")
        workspace = workspace_path(self._work_dir, task)
        previous = self._workspaces.get(task.task_id)
        if previous is not None and previous != workspace:
            # Prepared again under a new lease without a cleanup in between.
            await asyncio.to_thread(discard, previous, self._work_dir)
        self._workspaces[task.task_id] = workspace
        self._cancel_requested.discard(task.task_id)
        self._task_python.pop(task.task_id, None)
        if task.requirements and self._environments is not None:
            # On the interpreter tasks run with here (a root worker's tasks: the system's).
            base = confinement.python if confinement is not None else self._python
            python = await asyncio.to_thread(
                self._environments.venv_python,
                task.environment or "python",
                task.requirements,
                base,
                self._environment_progress(task.task_id),
            )
            if confinement is not None and confinement.run_as is not None:
                # A root worker's tasks run as nobody, and their view binds the environment by
                # path: the work folder (made 0700 by the first workspace) and the
                # environments' folder (public packages, no secrets) must be passable to them
                # (o+x: passing through, not listing), whichever way the sandbox is built.
                await asyncio.to_thread(sandbox_linux.passable_by_others, self._work_dir)
                await asyncio.to_thread(sandbox_linux.passable_by_others, python.parents[2])
                problem = sandbox_linux.reachable_by_tasks(python.parent.parent)
                if problem:
                    raise ExecutorError(problem)
            self._task_python[task.task_id] = str(python)
        try:
            await asyncio.to_thread(prepare_workspace, task, workspace, self._work_dir)
            if confinement is not None and confinement.run_as is not None:
                await asyncio.to_thread(sandbox_linux.chown_tree, workspace, confinement.run_as)
                problem = sandbox_linux.open_work_dir_to_tasks(confinement, self._work_dir)
                if problem:
                    raise ExecutorError(problem)
            if sys.platform == "win32":
                await asyncio.to_thread(windows_job.label_low, str(workspace))
        except BaseException:
            with contextlib.suppress(OSError):
                await asyncio.to_thread(rmtree, workspace)
            raise

    # ---------------------------------------------------------------- run

    def cancel_requested(self, task_id: str) -> bool:
        return task_id in self._cancel_requested

    async def _run(
        self,
        task: TaskSpec,
        on_log: LogSink | None,
        workspace: Path,
        result: TaskResult,
    ) -> None:
        results_dir = workspace / Path(*task.result_path.parts)
        memory = task.resources.memory_bytes
        disk = task.resources.disk_bytes
        cpus = task.resources.cpus
        confinement = await self.confinement()
        walls = confinement.walls if confinement is not None else ""
        limits = plimits.ProcessLimits(
            address_space_bytes=memory
            + ADDRESS_SPACE_ALLOWANCE
            + EXTRA_ADDRESS_SPACE.get(task.environment, 0),
            cpu_seconds=task.timeout_seconds * max(1, math.ceil(cpus)) + CPU_LIMIT_SLACK_SECONDS,
            # Per file: a backstop against filling the disk in one write; the workspace as a
            # whole is watched (process_run.sample).
            file_size_bytes=disk,
            max_processes=(
                sandbox_linux.MAX_PROCESSES
                if confinement is not None and confinement.process_cap
                else None
            ),
        )
        tree = cgroups.TaskLimits(
            max_processes=sandbox_linux.MAX_PROCESSES,
            memory_bytes=memory,
            cpus=cpus if cpus > 0 else float(os.cpu_count() or 1),
        )
        limiter = await self.tree_limiter()
        group: cgroups.TaskCgroup | None = None
        if limiter is not None and limiter.kind in ("v1", "v2"):
            try:
                group = await asyncio.to_thread(limiter.make, task.task_id, tree)
            except OSError as exc:
                result.error = f"could not limit the task's processes: {exc}"
                return
            walls += "G"  # wait until the worker has put it in its cgroup
        if "M" in walls:
            # The task's view, as in the Docker executor.
            results_dir = Path(launcher.WORKSPACE, *task.result_path.parts)
        tmp_bytes = max(min(disk or TMPFS_MAX_BYTES, TMPFS_MAX_BYTES, memory // 2), MiB)
        workspace_fd = -1
        python = self._task_python.get(task.task_id, self._python)
        if confinement is not None and task.task_id in self._task_python:
            # The task's environment, read-only in its view beside the interpreter's own.
            venv = str(Path(python).parent.parent)
            confinement = dataclasses.replace(
                confinement, python=python, binds=(*confinement.binds, venv)
            )
        if confinement is not None:
            # Open for bubblewrap, which binds it by descriptor (see sandbox_linux.launch).
            workspace_fd = os.open(workspace, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            command = sandbox_linux.launch(
                confinement, limits, "main.py", task.argv, walls=walls, tmp_bytes=tmp_bytes,
                workspace_fd=workspace_fd,
            )  # fmt: skip
        else:
            command = sandbox_linux.Launch(
                plimits.launch_argv(
                    python, limits, "main.py", task.argv, walls=walls, tmp_bytes=tmp_bytes
                )
            )
        argv = command.argv
        if limiter is not None:
            argv = limiter.wrap(argv, tree)
        identity: dict[str, Any] = sandbox_linux.identity_kwargs(
            confinement.run_as if confinement else None
        )
        job: windows_job.Job | None = None
        if sys.platform == "win32":
            argv = windows_job.launch_argv(python, "main.py", task.argv)
            identity = {"creationflags": windows_job.creation_flags()}
            try:
                job = windows_job.Job(windows_job.JobLimits(memory, tree.cpus, tree.max_processes))
            except OSError as exc:
                result.error = f"could not limit the task: {exc}"
                return
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=workspace,
                stdin=subprocess.PIPE if group is not None else subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                env=task_environment(task, workspace, results_dir, confined="M" in walls),
                limit=READ_CHUNK,
                pass_fds=command.pass_fds,
                **identity,
            )
        except (OSError, subprocess.SubprocessError, ValueError) as exc:
            result.error = f"could not start the task: {exc}"
            command.close()
            if workspace_fd >= 0:
                os.close(workspace_fd)
            if group is not None:
                await asyncio.to_thread(group.remove)
            if job is not None:
                job.close()
            return
        command.close()
        if workspace_fd >= 0:
            os.close(workspace_fd)
        if group is not None and not await self._enter(proc, group, result):
            return
        if job is not None:
            try:
                job.adopt(proc.pid)  # it was created suspended: nothing ran outside the job
            except OSError as exc:
                result.error = f"could not limit the task: {exc}"
                job.close()  # kill-on-close ends it
                await proc.wait()
                return
        run = Running(task, proc, started=time.monotonic(), workspace=workspace, disk_limit=disk)
        run.job = job
        # Registered before any await, so a pause() from here on reaches this task.
        self._running[task.task_id] = run
        if task.task_id in self._cancel_requested:
            # Cancelled while it was being started (after run() looked, before it was
            # registered here): cancel() could only note it, so it is carried out now.
            run.cancelled = True
            self._signal(run, SIGKILL)
        # A cgroup v2 folder freezes and throttles the whole tree at once; else signals.
        v2 = (
            group.folders[0] if group is not None and group.version == 2 and group.folders else None
        )
        run.control = TreeControl(lambda sig: self._signal(run, sig), cgroup=v2, cpus=cpus)
        if self._paused:
            run.paused_at = run.started
            run.control.freeze()
        self._rebalance()
        reader = asyncio.create_task(self._pump(run, on_log))
        try:
            run.leader = await asyncio.to_thread(psutil_process, proc.pid)
            await self._supervise(run, reader)
        finally:
            # However the run ends (exit, timeout, cancel, or this coroutine being cancelled),
            # nothing the task started may outlive it.
            run.control.close()
            self._signal(run, SIGKILL)
            self._running.pop(task.task_id, None)
            self._rebalance()
            await self._drain(run, reader)
            oom = False
            if job is not None:
                job.close()
            if group is not None:
                oom = await asyncio.to_thread(group.oom_killed)
                await asyncio.to_thread(group.remove)

        rc = proc.returncode if proc.returncode is not None else -SIGKILL
        result.finished_at = time.time()
        result.exit_code = 128 - rc if rc < 0 else rc
        result.log_tail = bytes(run.tail)
        result.cpu_seconds = run.cpu_seconds
        result.max_memory_bytes = run.max_rss
        settle_status(
            result,
            task,
            cancelled=run.cancelled,
            timed_out=run.timed_out,
            disk_exceeded=run.disk_exceeded,
            disk_limit=disk,
            # Only a failed exit: a task that caught a MemoryError and went on succeeded. The
            # task's cgroup (where it has one) tells of the kernel's OOM killer.
            out_of_memory=rc != 0
            and (oom or any(m in run.tail[-_OOM_SCAN_BYTES:] for m in _OOM_MARKERS)),
            memory_limit=memory,
            failure=exit_error(rc, run.tail),
        )
        await collect_results(
            result,
            lambda: pack_results(task, workspace, self.archive_dir, self._max_result_files),
            (OSError,),
            "pack",
        )

    async def _enter(
        self, proc: asyncio.subprocess.Process, group: cgroups.TaskCgroup, result: TaskResult
    ) -> bool:
        """Put the waiting launcher in the task's cgroup, then let it go on (wall "G")."""
        try:
            await asyncio.to_thread(group.add, proc.pid)
        except OSError as exc:
            result.error = f"could not limit the task's processes: {exc}"
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            rc = await proc.wait()
            if isinstance(exc, ProcessLookupError):
                # Not the cgroup's fault: the launcher was already gone (ESRCH), having died
                # before it could read the go byte, e.g. in the forked child before exec.
                ended = exit_error(rc, b"")
                result.error = f"the task's launcher ended before the task started: {ended}"
                log.error("task %s: %s", result.task_id, result.error)
            await asyncio.to_thread(group.remove)
            return False
        assert proc.stdin is not None
        proc.stdin.write(b"g")
        proc.stdin.close()
        return True

    async def _supervise(self, run: Running, reader: asyncio.Task[None]) -> None:
        # asyncio's Process.wait() only returns once the stdout pipe is closed too, which a
        # grandchild holding it can delay forever; returncode is set at the exit itself.
        # The end of output usually comes with the exit, so it cuts the polling short.
        proc = run.proc
        timeout = run.task.timeout_seconds
        while proc.returncode is None:
            now = time.monotonic()
            if now - run.last_sample >= SAMPLE_INTERVAL:
                run.last_sample = now
                await asyncio.to_thread(sample, run)
                if run.disk_exceeded and not run.cancelled:
                    self._signal(run, SIGKILL)
                continue
            if not run.cancelled and run.paused_at is None and run.active_seconds(now) >= timeout:
                run.timed_out = True
                await self._terminate(run)
                return
            if reader.done():
                await asyncio.sleep(EXIT_POLL_INTERVAL)  # output closed: the exit is near
            else:
                await asyncio.wait({reader}, timeout=POLL_INTERVAL)
        await asyncio.to_thread(sample, run)

    async def _terminate(self, run: Running) -> None:
        """SIGTERM the task, give it a short grace to finish writing, then SIGKILL."""
        self._signal(run, signal.SIGTERM)
        deadline = time.monotonic() + TERM_GRACE_SECONDS
        # Polled: no event fires at the exit itself (see _supervise).
        while run.proc.returncode is None and time.monotonic() < deadline:  # noqa: ASYNC110
            await asyncio.sleep(POLL_INTERVAL)
        self._signal(run, SIGKILL)

    async def _pump(self, run: Running, on_log: LogSink | None) -> None:
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

    async def _drain(self, run: Running, reader: asyncio.Task[None]) -> None:
        """Wait (bounded) for the killed task's pipe to close and its output to be read."""
        await wait_at_most(run.proc.wait(), DRAIN_SECONDS)  # see aio.py: no lost cancel
        _, pending = await asyncio.wait({reader}, timeout=DRAIN_SECONDS)
        if pending:
            # Something outside the task's tree holds the pipe open; stop reading it.
            reader.cancel()
            await asyncio.wait({reader})  # (awaiting it would swallow our own cancellation)
        elif not reader.cancelled() and reader.exception() is not None:
            log.warning(
                "reading output of task %s failed: %s", run.task.task_id, reader.exception()
            )

    def _signal(self, run: Running, sig: int) -> None:
        # Plain syscalls (kill, and a /proc read per known process to guard against pid
        # reuse): microseconds each, so done inline on the loop.
        if run.job is not None:  # Windows: the job holds the whole tree
            self._signal_job(run, sig)
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            # After the leader is reaped its pid stays the group id while any member lives
            # (Linux never reuses a pid still in use as a process group id).
            os.killpg(run.proc.pid, sig)
        with run.lock:
            known = list(run.known)
        for p in known:
            with contextlib.suppress(psutil.Error, OSError):
                p.send_signal(sig)

    def _signal_job(self, run: Running, sig: int) -> None:
        assert run.job is not None
        if sig in (SIGKILL, signal.SIGTERM):
            run.job.terminate()
            return
        with run.lock:
            known = list(run.known)
        if run.leader is not None:
            known.append(run.leader)
        for p in known:
            with contextlib.suppress(psutil.Error, OSError):
                if sig == SIGSTOP:
                    p.suspend()
                elif sig == SIGCONT:
                    p.resume()

    # ---------------------------------------------------------------- control

    async def cancel(self, task_id: str) -> None:
        run = self._running.get(task_id)
        if run is None:
            if task_id in self._workspaces:
                self._cancel_requested.add(task_id)
            return
        if not run.timed_out:
            run.cancelled = True
        self._signal(run, SIGKILL)

    async def pause(self) -> None:
        self._paused = True
        now = time.monotonic()
        for run in list(self._running.values()):
            if run.paused_at is None:
                run.paused_at = now
                if run.control is not None:
                    run.control.freeze()

    async def resume(self) -> None:
        self._paused = False
        now = time.monotonic()
        for run in list(self._running.values()):
            if run.paused_at is not None:
                # The paused time is not counted against the task's timeout.
                run.paused_total += now - run.paused_at
                run.paused_at = None
                if run.control is not None:
                    run.control.thaw()

    async def apply_caps(self, caps: Resources) -> None:
        """Scale running tasks' CPU down to fit new caps and the CPU-time share, live.

        Through the task's cgroup cpu.max where it has one, else a stop/continue duty cycle
        of its tree (freeze.py). Memory is left alone, as in Docker: new caps bound new tasks.
        """
        self._cpu_cap = caps.cpus
        self._rebalance()

    def _rebalance(self) -> None:
        """Give each running task its share: the caps over what all of them asked for, times
        the CPU-time share; again whenever a task starts or ends."""
        runs = list(self._running.values())
        wanted = sum(r.task.resources.cpus for r in runs)
        cap = self._cpu_cap
        factor = min(1.0, cap / wanted) if wanted > 0 and cap > 0 else 1.0
        for run in runs:
            if run.control is not None:
                run.control.set_share(factor * self.cpu_time_share)

    async def cleanup(self, task_id: str) -> None:
        run = self._running.get(task_id)
        if run is not None:
            if not run.timed_out:
                run.cancelled = True
            self._signal(run, SIGKILL)
        self._cancel_requested.discard(task_id)
        self._task_python.pop(task_id, None)
        workspace = self._workspaces.pop(task_id, None)
        if workspace is not None:
            # Moved aside at once and deleted in the background: a workspace of 100,000
            # files must not hold up the report that waits for this cleanup.
            await asyncio.to_thread(discard, workspace, self._work_dir)

    def usage(self) -> dict[str, Usage]:
        return {task_id: run.usage for task_id, run in self._running.items()}

    async def close(self) -> None:
        for run in list(self._running.values()):
            if not run.timed_out:
                run.cancelled = True
            self._signal(run, SIGKILL)
