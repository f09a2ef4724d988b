"""What the windows show, built from the bridge's signals: state, tasks, history, totals, log."""

from __future__ import annotations

import collections
import concurrent.futures
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import QObject, Signal

from hivemind_worker.config import read_state, update_state
from hivemind_worker.engine.events import (
    EngineState,
    ErrorRaised,
    MetricsSample,
    ResultDelivered,
    StateChanged,
    TaskFinished,
    TaskOutput,
    TaskStarted,
)
from hivemind_worker.engine.executors.base import Usage
from hivemind_worker.engine.monitor import HostSample
from hivemind_worker.gui.engine_thread import Bridge
from hivemind_worker.paths import Paths
from hivemind_worker.tasks import TaskStatus

HISTORY_SECONDS = 300  # the charts show the last five minutes
MAX_LOG = 2000
MAX_RESULTS = 200


@dataclass
class Totals:
    """Persisted across restarts in the runtime state file, not in settings."""

    done: int = 0
    failed: int = 0
    cpu_seconds: float = 0.0

    @property
    def cpu_hours(self) -> float:
        return self.cpu_seconds / 3600


@dataclass
class RunningTask:
    task_id: str
    name: str
    kind: str
    image: str
    started: float
    usage: Usage = field(default_factory=Usage)
    # Recent (time, cpu %, memory bytes) samples for the per-task chart lines.
    history: collections.deque[tuple[float, float, int]] = field(
        default_factory=lambda: collections.deque(maxlen=HISTORY_SECONDS + 5)
    )


@dataclass(frozen=True)
class ResultRow:
    task_id: str
    name: str
    status: TaskStatus
    duration: float
    exit_code: int
    error: str
    result_size: int
    finished: float
    delivered: bool | None = None  # None while on its way to the pool


@dataclass(frozen=True)
class LogEntry:
    when: float
    category: str  # "state", "task", "error", "output"
    text: str


STATE_TEXT = {
    EngineState.STOPPED: "Not contributing",
    EngineState.CONNECTING: "Connecting",
    EngineState.IDLE: "Contributing: waiting for work",
    EngineState.BUSY: "Contributing",
    EngineState.PAUSED: "Paused",
    EngineState.WAITING: "Waiting",
    EngineState.DRAINING: "Finishing running tasks",
    EngineState.ERROR: "Needs attention",
}


class WorkerModel(QObject):
    """One place that folds engine events into what the tray and the dashboard display."""

    stateChanged = Signal()
    metricsChanged = Signal()
    tasksChanged = Signal()
    resultsChanged = Signal()
    totalsChanged = Signal()
    logAdded = Signal(object)  # LogEntry

    def __init__(self, bridge: Bridge, paths: Paths, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.paths = paths
        self.state = EngineState.STOPPED
        self.state_message = ""
        self.retry_at: float | None = None
        self.host: HostSample | None = None
        self.host_history: collections.deque[tuple[float, float, int]] = collections.deque(
            maxlen=HISTORY_SECONDS + 5
        )
        self.running: dict[str, RunningTask] = {}
        self.results: collections.deque[ResultRow] = collections.deque(maxlen=MAX_RESULTS)
        self.log: collections.deque[LogEntry] = collections.deque(maxlen=MAX_LOG)
        self.totals = self._load_totals()
        # State writes fsync; one ordered background writer keeps them off the GUI thread.
        self._writer = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="state")
        bridge.stateChanged.connect(self._on_state)
        bridge.metrics.connect(self._on_metrics)
        bridge.taskStarted.connect(self._on_started)
        bridge.taskFinished.connect(self._on_finished)
        bridge.taskOutput.connect(self._on_output)
        bridge.resultDelivered.connect(self._on_delivered)
        bridge.error.connect(self._on_error)

    # ------------------------------------------------------------------ totals

    def _load_totals(self) -> Totals:
        raw = read_state(self.paths).get("totals")
        if not isinstance(raw, dict):
            return Totals()
        try:
            return Totals(
                done=int(raw.get("done", 0)),
                failed=int(raw.get("failed", 0)),
                cpu_seconds=float(raw.get("cpu_seconds", 0.0)),
            )
        except (TypeError, ValueError):
            return Totals()

    def _save_totals(self) -> None:
        snapshot = {
            "done": self.totals.done,
            "failed": self.totals.failed,
            "cpu_seconds": round(self.totals.cpu_seconds, 3),
        }

        def put(state: dict[str, Any]) -> None:
            state["totals"] = snapshot

        self.write_state(put)

    def write_state(self, mutate: Callable[[dict[str, Any]], None]) -> None:
        """Change the runtime state file in the background, in order."""
        self._writer.submit(update_state, self.paths, mutate)

    def flush(self, timeout: float = 10.0) -> None:
        """Wait for pending state writes (at quit); the writer runs them in order."""
        self._writer.submit(lambda: None).result(timeout)

    # ------------------------------------------------------------------ events

    def add_log(self, category: str, text: str) -> None:
        entry = LogEntry(time.time(), category, text)
        self.log.append(entry)
        self.logAdded.emit(entry)

    def _on_state(self, event: StateChanged) -> None:
        changed = event.state != self.state
        self.state, self.state_message, self.retry_at = event.state, event.message, event.retry_at
        if changed or event.message:
            text = STATE_TEXT[event.state]
            self.add_log("state", f"{text}: {event.message}" if event.message else text)
        self.stateChanged.emit()

    def _on_metrics(self, event: MetricsSample) -> None:
        now = time.time()
        self.host = event.host
        self.host_history.append((now, event.host.cpu_percent, event.host.memory_used_bytes))
        for task_id, usage in event.tasks.items():
            task = self.running.get(task_id)
            if task is not None:
                task.usage = usage
                task.history.append((now, usage.cpu_percent, usage.memory_bytes))
        self.metricsChanged.emit()

    def _on_started(self, event: TaskStarted) -> None:
        self.running[event.task_id] = RunningTask(
            event.task_id, event.name, event.kind, event.image, time.time()
        )
        attempt = f" (attempt {event.attempt})" if event.attempt > 1 else ""
        self.add_log("task", f"Started {event.name}{attempt}")
        self.tasksChanged.emit()

    def _on_finished(self, event: TaskFinished) -> None:
        self.running.pop(event.task_id, None)
        self.results.appendleft(
            ResultRow(
                event.task_id,
                event.name,
                event.status,
                event.duration,
                event.exit_code,
                event.error,
                event.result_size,
                time.time(),
            )
        )
        if event.status is TaskStatus.SUCCEEDED:
            self.totals.done += 1
        elif event.status is not TaskStatus.CANCELLED:  # a cancel is not the task's failure
            self.totals.failed += 1
        self.totals.cpu_seconds += max(0.0, event.cpu_seconds)
        self._save_totals()
        detail = f": {event.error}" if event.error else ""
        self.add_log(
            "error" if event.status is TaskStatus.FAILED else "task",
            f"Finished {event.name}: {event.status.value} in {event.duration:.1f} s{detail}",
        )
        self.tasksChanged.emit()
        self.resultsChanged.emit()
        self.totalsChanged.emit()

    def _on_output(self, event: TaskOutput) -> None:
        name = self.running[event.task_id].name if event.task_id in self.running else event.task_id
        for line in event.text.splitlines():
            if line.strip():
                self.add_log("output", f"{name}: {line}")

    def _on_delivered(self, event: ResultDelivered) -> None:
        for i, row in enumerate(self.results):
            if row.task_id == event.task_id and row.delivered is None:
                self.results[i] = ResultRow(**{**row.__dict__, "delivered": event.accepted})
                break
        if not event.accepted:
            self.add_log("error", f"Result of {event.task_id} dropped: {event.message}")
        self.resultsChanged.emit()

    def _on_error(self, event: ErrorRaised) -> None:
        self.add_log("error", f"{event.title}: {event.message}")

    # ------------------------------------------------------------------ views

    @property
    def state_text(self) -> str:
        return STATE_TEXT[self.state]

    def current_task_text(self) -> str:
        if not self.running:
            return "no task running"
        names = [t.name for t in self.running.values()]
        return names[0] if len(names) == 1 else f"{names[0]} and {len(names) - 1} more"
