"""The engine's task lifecycle: take what the pool hands out, run it, deliver its result.

A mixin of WorkerEngine (engine.py), kept in its own room: the engine owns the session and
the commands, this part owns `_running`. The attributes it uses are declared below; the
engine sets them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from hivemind_worker.config import Settings
from hivemind_worker.engine import memory, runners
from hivemind_worker.engine.delivery import Delivery
from hivemind_worker.engine.events import (
    ErrorRaised,
    EventHub,
    TaskFinished,
    TaskOutput,
    TaskStarted,
)
from hivemind_worker.engine.executors.base import Executor, ExecutorError
from hivemind_worker.engine.pool_client import RefusedSpec
from hivemind_worker.errors import ErrorKind
from hivemind_worker.logs import task_context
from hivemind_worker.tasks import Resources, TaskResult, TaskSpec, TaskSpecError, TaskStatus

log = logging.getLogger("hivemind_worker.engine.engine")


@dataclass
class _Running:
    spec: TaskSpec
    started: float
    task: asyncio.Task[None] | None = None
    finished: bool = False  # execution over; the result may still be on its way to the pool
    adopted: bool = False  # left running by an earlier run of this worker; re-attached
    cancel_requested: bool = False  # checked after prepare(), so an early cancel is not lost
    exclude_here: bool = False  # the person cancelled it here: the pool must not hand it back


class TaskRuns:
    """Running tasks, from acceptance to delivered result (mixed into WorkerEngine)."""

    settings: Settings
    if TYPE_CHECKING:

        @property
        def executor(self) -> Executor: ...  # WorkerEngine's, chosen when run() starts

    delivery: Delivery
    tasks_done: int
    tasks_failed: int
    _hub: EventHub
    _running: dict[str, _Running]
    _paused: bool
    _draining: bool
    _want_running: bool
    _shutdown: bool

    if TYPE_CHECKING:  # provided by WorkerEngine or the other mixin; declared for mypy only

        def _spawn(self, coro: Awaitable[object], what: str) -> None: ...

        def _refresh_state(self) -> None: ...

        def _poke(self) -> None: ...

        def _caps(self) -> Resources: ...

        def _capabilities(self) -> tuple[str, ...]: ...

        def _held(self) -> bool: ...

    def _adopt_leftovers(self, spooled: set[tuple[str, str]]) -> None:
        """Re-attach tasks an earlier run left running: they hold their leases (heartbeats
        renew them, capacity counts them) and report like any task. A lease the pool no
        longer honours stops the task, and its result is dropped as stale."""
        for spec in self.executor.adoptable():
            if (spec.task_id, spec.lease_id) in spooled or spec.task_id in self._running:
                # Its result was spooled before the crash: the outbox delivers that one.
                self._spawn(self.executor.cleanup(spec.task_id), "cleanup")
                continue
            run = _Running(spec=spec, started=time.time(), adopted=True)
            self._running[spec.task_id] = run
            run.task = asyncio.create_task(self._run_task(run), name=f"task-{spec.task_id}")

    def _cancel_running(self) -> None:
        """Kill running tasks; their CANCELLED reports tell the pool to hand them out again."""
        for run in list(self._running.values()):
            if not run.finished and not run.cancel_requested:
                run.cancel_requested = True
                self._spawn(self.executor.cancel(run.spec.task_id), "cancel")

    def _in_use(self) -> Resources:
        total = Resources()
        for run in self._running.values():
            if not run.finished:
                total = total + run.spec.resources
        return total

    def _take(self, offered: list[TaskSpec | RefusedSpec], *, asked: int) -> None:
        """Take what the pool handed out, never more than was asked for: the rest goes back."""
        taken = 0
        for spec in offered:
            if isinstance(spec, RefusedSpec):
                log.warning("refusing task %s: %s", spec.task_id, spec.reason)
                if spec.task_id and spec.lease_id:
                    self._spawn(
                        self.delivery.refuse(spec.task_id, spec.lease_id, spec.reason), "refuse"
                    )
                continue
            if taken >= asked and not self.delivery.already_reported(spec.task_id, spec.lease_id):
                log.warning("giving task %s back: more tasks than asked for", spec.task_id)
                self._spawn(
                    self.delivery.give_back(
                        spec.task_id, spec.lease_id, f"this worker asked for {asked} task(s)"
                    ),
                    "give back",
                )
                continue
            taken += 1
            self._accept(spec)

    def _accept(self, spec: TaskSpec) -> None:
        if self.delivery.already_reported(spec.task_id, spec.lease_id):
            # A lease this worker has already run and reported, handed out again: never run
            # a lease twice, whatever the pool sends. Its report stands; nothing more is sent.
            log.warning(
                "task %s: lease %s was already reported; not running it again",
                spec.task_id,
                spec.lease_id,
            )
            return
        earlier = self._running.get(spec.task_id)
        if earlier is not None:
            if earlier.adopted and earlier.spec.lease_id != spec.lease_id and earlier.task:
                # Re-queued while this worker was down and handed out anew: the pool no longer
                # honours the adopted lease. Stop that run (its report is dropped as stale),
                # then take the task up under the new lease.
                log.warning("task %s was re-queued; stopping its re-attached run", spec.task_id)
                if not earlier.finished and not earlier.cancel_requested:
                    earlier.cancel_requested = True
                    self._spawn(self.executor.cancel(spec.task_id), "cancel")
                self._spawn(self._accept_after(earlier.task, spec), "accept again")
                return
            if (
                earlier.finished
                and earlier.task is not None
                and earlier.spec.lease_id != spec.lease_id
            ):
                # Given back a moment ago (cancelled here) and handed out again while the
                # first run's report was still finishing: take it up once that run is gone.
                self._spawn(self._accept_after(earlier.task, spec), "accept again")
                return
            log.warning("task %s handed out twice; ignoring the second lease", spec.task_id)
            return
        if self._held() or self._draining or not self._want_running or self._shutdown:
            problem = "this worker has just paused or is stopping"
        else:
            problem = self._check_fits(spec)
        if problem:
            # Not the task's fault: give it back (CANCELLED) so the pool hands it to another
            # worker, instead of REJECTED, which ends it.
            log.warning("giving task %s back: %s", spec.task_id, problem)
            self._spawn(self.delivery.give_back(spec.task_id, spec.lease_id, problem), "give back")
            return
        run = _Running(spec=spec, started=time.time())
        self._running[spec.task_id] = run
        run.task = asyncio.create_task(self._run_task(run), name=f"task-{spec.task_id}")
        self._refresh_state()
        self._poke()  # the policy looks again at once (a task runs: its cadence quickens)

    async def _accept_after(self, earlier: asyncio.Task[None], spec: TaskSpec) -> None:
        await asyncio.wait({earlier})
        self._accept(spec)

    def _check_fits(self, spec: TaskSpec) -> str:
        active = sum(1 for r in self._running.values() if not r.finished)
        if active >= self.settings.max_concurrent_tasks:
            return f"{active} task(s) already running, this worker's limit"
        if spec.timeout_seconds > self.settings.task_timeout:
            return (
                f"timeout {spec.timeout_seconds} s is over this worker's limit of "
                f"{self.settings.task_timeout} s"
            )
        if spec.network not in ("none", self.settings.docker_network):
            return f"network '{spec.network}' is not allowed on this worker"
        free = self._caps() - self._in_use()
        if not spec.resources.fits_in(free):
            r = spec.resources
            return (
                f"asks for {r.cpus:g} CPU, {r.memory_bytes >> 20} MiB memory, "
                f"{r.disk_bytes >> 20} MiB disk; only {max(free.cpus, 0):g} CPU, "
                f"{max(free.memory_bytes, 0) >> 20} MiB, {max(free.disk_bytes, 0) >> 20} MiB free"
            )
        return ""

    async def _run_task(self, run: _Running) -> None:
        spec = run.spec
        with task_context(spec.task_id):
            log.info(
                "%s %s (attempt %d)",
                "re-attaching to" if run.adopted else "starting",
                spec.label,
                spec.attempt,
            )
            self._hub.publish(
                TaskStarted(
                    spec.task_id,
                    spec.lease_id,
                    spec.label,
                    spec.kind.value,
                    spec.image,
                    spec.resources,
                    spec.attempt,
                )
            )
            result = await self._execute(spec, adopted=run.adopted)
            result.exclude_this_node = result.exclude_this_node or run.exclude_here
            run.finished = True
            self._refresh_state()
            self._poke()
            if result.status is TaskStatus.SUCCEEDED:
                self.tasks_done += 1
            else:
                self.tasks_failed += 1
            duration = (result.finished_at or time.time()) - (result.started_at or run.started)
            log.info(
                "finished %s: %s%s", spec.label, result.status.value,
                f" ({result.error})" if result.error else "",
            )  # fmt: skip
            self._hub.publish(
                TaskFinished(
                    spec.task_id,
                    spec.lease_id,
                    spec.label,
                    result.status,
                    result.exit_code,
                    result.error,
                    duration,
                    result.archive_size,
                    result.cpu_seconds,
                )
            )
            spooled = await self.delivery.spool(result, spec.max_result_bytes)
            with contextlib.suppress(Exception):
                await self.executor.cleanup(spec.task_id)
            try:
                await self.delivery.finish(result, spec.max_result_bytes, spooled=spooled)
            finally:
                self._running.pop(spec.task_id, None)
                self._refresh_state()
                self._poke()
                if not self._running:  # idle again: give the task's peak memory back
                    self._spawn(asyncio.to_thread(memory.trim), "trim memory")

    async def _execute(self, spec: TaskSpec, *, adopted: bool = False) -> TaskResult:
        progress = runners.ProgressReader()

        def on_log(task_id: str, chunk: bytes) -> None:
            text = chunk.decode("utf-8", "replace")
            self._hub.publish(TaskOutput(task_id, text))
            for event in progress.feed(task_id, text):  # a runner's "epoch 3 of 10" lines
                self._hub.publish(event)

        started = time.time()
        try:
            if adopted:
                return runners.with_reason(await self.executor.reattach(spec, on_log), spec)
            runnable = self._runnable(spec)
            await self.executor.prepare(runnable)
            run = self._running.get(spec.task_id)
            if run is not None and run.cancel_requested:
                return TaskResult(spec.task_id, spec.lease_id, TaskStatus.CANCELLED, -1,
                                  "cancelled before it started", started_at=started,
                                  finished_at=time.time())  # fmt: skip
            return runners.with_reason(await self.executor.run(runnable, on_log), runnable)
        except TaskSpecError as exc:
            return TaskResult(spec.task_id, spec.lease_id, TaskStatus.REJECTED, -1, str(exc),
                              started_at=started, finished_at=time.time())  # fmt: skip
        except ExecutorError as exc:
            if exc.kind is ErrorKind.IMAGE_UNAVAILABLE:
                # Not the task's fault but this computer's (no registry it can reach): the
                # person is told, and the task goes back to the pool for another computer,
                # never to this one again (so it cannot use up its attempts here).
                self._hub.publish(ErrorRaised.of(exc))
                declined = TaskResult(spec.task_id, spec.lease_id, TaskStatus.CANCELLED, -1,
                                      f"declined: {exc}", started_at=started,
                                      finished_at=time.time())  # fmt: skip
                declined.exclude_this_node = True
                return declined
            return TaskResult(spec.task_id, spec.lease_id, TaskStatus.FAILED, -1, str(exc),
                              started_at=started, finished_at=time.time())  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an executor bug must not take the engine down
            log.exception("executor failed on %s", spec.task_id)
            return TaskResult(spec.task_id, spec.lease_id, TaskStatus.FAILED, -1,
                              f"worker error: {exc}", started_at=started,
                              finished_at=time.time())  # fmt: skip

    def _runnable(self, spec: TaskSpec) -> TaskSpec:
        """What the executor runs: an ml or data task becomes its runner's python task, once
        checked against what this worker offers (the person may have turned it off since)."""
        needed = spec.required_capability
        if needed and needed not in self._capabilities():
            raise TaskSpecError("kind", f"this worker does not run {needed} tasks")
        return runners.materialize(spec)

    async def _stop_all_tasks(self) -> None:
        runs = [r for r in self._running.values() if r.task is not None]
        for run in runs:
            if not run.finished:
                with contextlib.suppress(Exception):
                    await self.executor.cancel(run.spec.task_id)
        for run in runs:
            assert run.task is not None
            run.task.cancel()
        await asyncio.gather(*(r.task for r in runs if r.task is not None), return_exceptions=True)
        for run in runs:
            with contextlib.suppress(Exception):
                await self.executor.cleanup(run.spec.task_id)
        self._running.clear()
