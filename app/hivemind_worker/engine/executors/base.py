"""The executor interface: how a task is prepared, run, cancelled, paused and cleaned up."""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

from hivemind_worker.engine.tasks import Resources, TaskResult, TaskSpec

LogSink = Callable[[str, bytes], None]
"""Called with (task_id, chunk) as a task writes output; must not block."""


@dataclass(frozen=True)
class Usage:
    """A recent sample of one running task's resource use."""

    cpu_percent: float = 0.0
    memory_bytes: int = 0
    cpu_seconds: float = 0.0


class ExecutorError(Exception):
    """An executor cannot do what was asked; `str()` is a human reason."""


class Executor(abc.ABC):
    """Runs tasks in a sandbox; one instance per engine, called on the engine's loop."""

    #: The capability advertised to the pool: "docker" or "process".
    capability: str

    #: Told (image, bytes done, bytes total) while an image is pulled, from a worker thread
    #: (so it must not block); only executors that pull images call it.
    on_pull: Callable[[str, int, int], None] | None = None

    @abc.abstractmethod
    async def prepare(self, task: TaskSpec) -> None:
        """Make the workspace and inputs ready; raise TaskSpecError or ExecutorError to refuse."""

    @abc.abstractmethod
    async def run(
        self, task: TaskSpec, caps: Resources, on_log: LogSink | None = None
    ) -> TaskResult:
        """Run a prepared task to its end and return its result; never raises for task failures.

        `caps` are the limits this task gets: its request, already checked to fit the
        person's caps by the engine.
        """

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

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release what the executor holds (clients, watchers) at engine stop."""
