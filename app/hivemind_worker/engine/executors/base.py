"""The executor interface: how a task is prepared, run, cancelled, paused and cleaned up."""

from __future__ import annotations

import abc
import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.tasks import MiB, Resources, TaskResult, TaskSpec, TaskStatus

log = logging.getLogger(__name__)

LogSink = Callable[[str, bytes], None]
"""Called with (task_id, chunk) as a task writes output; must not block."""


@dataclass(frozen=True)
class Usage:
    """A recent sample of one running task's resource use."""

    cpu_percent: float = 0.0
    memory_bytes: int = 0
    cpu_seconds: float = 0.0
    network_rx_bytes: int = 0
    network_tx_bytes: int = 0


class PausableRun:
    """Mixed into an executor's record of a run: wall-clock time not counting pauses."""

    started: float  # time.monotonic()
    paused_at: float | None
    paused_total: float

    def active_seconds(self, now: float) -> float:
        """Wall-clock seconds the task has run, not counting time spent paused."""
        paused = self.paused_total
        if self.paused_at is not None:
            paused += now - self.paused_at
        return now - self.started - paused


class ExecutorError(HiveMindError):
    """An executor cannot do what was asked; `str()` is a human reason."""

    kind = ErrorKind.TASK_FAILED
    title = "Task could not run"


class ResultError(HiveMindError):
    """The results hold something the worker will not send back."""

    kind = ErrorKind.RESULT_REFUSED
    title = "Result refused"


def settle_status(
    result: TaskResult,
    task: TaskSpec,
    *,
    cancelled: bool,
    timed_out: bool,
    out_of_memory: bool,
    memory_limit: int,
    failure: str,
    disk_exceeded: bool = False,
    disk_limit: int = 0,
) -> None:
    """The status and error of a task whose run has ended, from how it ended.

    A cancel wins over a timeout, which wins over the disk limit (the executor stopped the
    task for writing past it: FAILED), which wins over running out of memory; then exit
    code 0 (`result.exit_code`) is SUCCEEDED and any other exit is FAILED with `failure`,
    the executor's own words for that exit.
    """
    if cancelled:
        result.status = TaskStatus.CANCELLED
        result.error = "cancelled"
    elif timed_out:
        result.status = TaskStatus.TIMED_OUT
        result.error = f"killed after {task.timeout_seconds} s timeout"
    elif disk_exceeded:
        result.status = TaskStatus.FAILED
        size = f"{disk_limit // MiB} MiB" if disk_limit >= MiB else f"{disk_limit} bytes"
        result.error = f"used more than its {size} disk limit"
    elif out_of_memory:
        result.status = TaskStatus.OUT_OF_MEMORY
        result.error = f"ran out of memory (limit {memory_limit // MiB} MiB)"
    elif result.exit_code == 0:
        result.status = TaskStatus.SUCCEEDED
    else:
        result.status = TaskStatus.FAILED
        result.error = failure


async def collect_results(
    result: TaskResult,
    pack: Callable[[], tuple[Path, str, int]],
    errors: tuple[type[BaseException], ...],
    failed_to: str,
) -> None:
    """The task's result archive into `result`, packed by `pack` in a thread; nothing for a
    cancelled task.

    Results that cannot be collected (ResultError, or one of `errors`: "cannot
    `failed_to` results: ...") fail a task that had succeeded; for a task that had already
    failed the reason is added to its error.
    """
    if result.status is TaskStatus.CANCELLED:
        return
    caught: tuple[type[BaseException], ...] = (ResultError, *errors)
    try:
        archive, digest, size = await asyncio.to_thread(pack)
    except caught as exc:
        reason = str(exc) if isinstance(exc, ResultError) else f"cannot {failed_to} results: {exc}"
        if result.status is TaskStatus.SUCCEEDED:
            result.status = TaskStatus.FAILED
            result.error = reason
        else:
            result.error = f"{result.error}; results not collected: {reason}"
        return
    result.archive, result.archive_sha256, result.archive_size = archive, digest, size


class Executor(abc.ABC):
    """Runs tasks in a sandbox; one instance per engine, called on the engine's loop."""

    #: The capability advertised to the pool: "docker" or "process".
    capability: str

    #: Told (image, bytes done, bytes total) while an image is pulled, from a worker thread
    #: (so it must not block); only executors that pull images call it.
    on_pull: Callable[[str, int, int], None] | None = None

    #: Whether this executor can build runner environments (the ml and data task kinds).
    runs_runners: bool = False

    #: Told (task id, environment name, one line) while a runner environment is built for a
    #: task being prepared, from a worker thread (so it must not block).
    on_environment: Callable[[str, str, str], None] | None = None

    #: Share (0-1] of their CPU limit that tasks may use: the policy's "use at most X % of CPU
    #: time". Set by the engine, which then calls apply_caps() to bring running tasks to it.
    cpu_time_share: float = 1.0

    #: How many tasks may run at once on this worker (the person's setting), set by the
    #: engine: an executor that keeps sandboxes ready keeps at most one per free slot.
    slots: int = 1

    #: Why this executor stands in for a better one (Docker enabled but unusable); the
    #: engine tells the person once at start. Empty when nothing needs saying.
    notice: str = ""

    @abc.abstractmethod
    async def prepare(self, task: TaskSpec) -> None:
        """Make the workspace and inputs ready; raise TaskSpecError or ExecutorError to refuse."""

    async def run(self, task: TaskSpec, on_log: LogSink | None = None) -> TaskResult:
        """Run a prepared task to its end and return its result; never raises for task failures.

        The task gets the limits it requested (`task.resources`), which the engine has checked
        to fit the person's caps. Raises ExecutorError only for a task never prepared.
        """
        workspace = self.workspace(task.task_id)
        if workspace is None:
            raise ExecutorError(f"task {task.task_id} was not prepared")
        result = TaskResult(task.task_id, task.lease_id, TaskStatus.FAILED, started_at=time.time())
        if self.cancel_requested(task.task_id):
            result.status = TaskStatus.CANCELLED
            result.error = "cancelled before it started"
            result.finished_at = time.time()
            return result
        return await self._guarded(task, result, self._run(task, on_log, workspace, result))

    def adoptable(self) -> list[TaskSpec]:
        """Tasks an earlier run of this worker left running (or finished but not collected)
        that this executor can follow to their end with reattach(); asked once, at engine
        start. The default: none (such tasks died with the worker)."""
        return []

    async def reattach(self, task: TaskSpec, on_log: LogSink | None = None) -> TaskResult:
        """Follow an adoptable task to its end and return its result, like run().

        Raises ExecutorError only for a task that adoptable() did not offer.
        """
        workspace = self.workspace(task.task_id)
        if workspace is None:
            raise ExecutorError(f"task {task.task_id} was not left by an earlier run")
        result = TaskResult(task.task_id, task.lease_id, TaskStatus.FAILED, started_at=time.time())
        return await self._guarded(task, result, self._reattach(task, on_log, workspace, result))

    async def _reattach(
        self, task: TaskSpec, on_log: LogSink | None, workspace: Path, result: TaskResult
    ) -> None:
        """Follow an adopted task, filling in `result`; only executors that adopt override it."""
        raise ExecutorError(f"the {self.capability} executor cannot re-attach tasks")

    async def _guarded(
        self, task: TaskSpec, result: TaskResult, body: Coroutine[Any, Any, None]
    ) -> TaskResult:
        try:
            await body
        except Exception as exc:  # run() never raises for what a task does
            log.exception("%s executor failed on task %s", self.capability, task.task_id)
            result.status = TaskStatus.FAILED
            result.error = f"worker error while running the task: {self.describe_error(exc)}"
            result.archive = None
        if not result.finished_at:
            result.finished_at = time.time()
        return result

    @abc.abstractmethod
    async def _run(
        self,
        task: TaskSpec,
        on_log: LogSink | None,
        workspace: Path,
        result: TaskResult,
    ) -> None:
        """Run the prepared task, filling in `result` (status, output, archive, usage)."""

    @abc.abstractmethod
    def workspace(self, task_id: str) -> Path | None:
        """The prepared task's workspace, until cleanup()."""

    @abc.abstractmethod
    def cancel_requested(self, task_id: str) -> bool:
        """Whether cancel() came for this task before it started."""

    async def preload(self, images: list[str]) -> None:  # noqa: B027 - optional hook
        """Fetch images the pool says its tasks will use; only executors with images do."""

    def runner_problem(self) -> str:
        """Why this executor cannot run the ml and data runners now, or "" (blocking)."""
        return "" if self.runs_runners else f"the {self.capability} executor does not run them"

    def _environment_progress(self, task_id: str) -> Callable[[str, str], None]:
        """A progress callback for an environment built for `task_id`."""

        def told(name: str, line: str) -> None:
            if self.on_environment is not None:
                self.on_environment(task_id, name, line)

        return told

    def describe_error(self, exc: Exception) -> str:
        """A human line for an unexpected failure inside _run()."""
        return str(exc)

    @abc.abstractmethod
    async def cancel(self, task_id: str) -> None:
        """Stop a running task; its `run()` then returns status CANCELLED."""

    @abc.abstractmethod
    async def pause(self) -> None:
        """Freeze every running task without losing its work."""

    @abc.abstractmethod
    async def resume(self) -> None:
        """Thaw what pause() froze."""

    @abc.abstractmethod
    async def cleanup(self, task_id: str) -> None:
        """Remove the task's workspace and anything else it left; safe to call twice."""

    @abc.abstractmethod
    def usage(self) -> dict[str, Usage]:
        """Latest usage sample of each running task, by task id; must not block."""

    async def apply_caps(self, caps: Resources) -> None:  # noqa: B027 - optional hook
        """The person's caps changed: bring running tasks within them where the sandbox can."""

    async def standby(self) -> None:  # noqa: B027 - optional hook
        """No task is coming for now (stopped, draining): release what is kept ready for the
        next one, until a task is prepared again."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the executor holds (clients, watchers) at engine stop."""
