"""What the windows show, built from the bridge's signals: state, tasks, history, totals, log."""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from PySide6.QtCore import QObject, Signal

from hivemind_worker.config import read_state, update_state
from hivemind_worker.engine.events import (
    EngineState,
    ErrorRaised,
    ImagePull,
    MetricsSample,
    PolicyChanged,
    ResultDelivered,
    StateChanged,
    TaskFinished,
    TaskOutput,
    TaskProgress,
    TaskStarted,
)
from hivemind_worker.engine.executors.base import Usage
from hivemind_worker.engine.monitor import HostSample
from hivemind_worker.errors import ErrorKind
from hivemind_worker.gui.engine_thread import Bridge
from hivemind_worker.gui.icons import Look, look_for
from hivemind_worker.gui.words import clock, for_kind, plural
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
    progress: TaskProgress | None = None  # the last one: "epoch 3 of 10, loss 0.412"

    @property
    def progress_text(self) -> str:
        return self.progress.label() if self.progress is not None else ""


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
        self.state_kind: ErrorKind | None = None
        self.state_details = ""
        self.snooze_until: float | None = None  # set by the app; shown in header and tray
        self.pulls: dict[str, tuple[int, int]] = {}  # image -> (done, total bytes)
        self.policy: PolicyChanged | None = None  # the last when-to-contribute decision
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
        bridge.taskProgress.connect(self._on_progress)
        bridge.resultDelivered.connect(self._on_delivered)
        bridge.error.connect(self._on_error)
        bridge.imagePull.connect(self._on_pull)
        bridge.policyChanged.connect(self._on_policy)

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
        retrying = (
            event.state is EngineState.CONNECTING
            and event.error_kind is None
            and self.state in (EngineState.CONNECTING, EngineState.ERROR)
            and self.state_kind is not None
        )
        if retrying:
            # Each new attempt after a failure: still the same trouble until it succeeds, so
            # the header does not flip between "Disconnected" and "Connecting" every retry.
            self.state = event.state
            return
        self.state, self.state_message, self.retry_at = event.state, event.message, event.retry_at
        self.state_kind, self.state_details = event.error_kind, event.details
        if changed or event.message:
            text = STATE_TEXT[event.state]
            # The log keeps the engine's own words and the raw details.
            message = f"{event.message} ({event.details})" if event.details else event.message
            self.add_log("state", f"{text}: {message}" if message else text)
        self.stateChanged.emit()

    def _on_policy(self, event: PolicyChanged) -> None:
        self.policy = event
        self.add_log("state", f"When to contribute: {event.line}")
        self.stateChanged.emit()

    def set_snooze(self, until: float | None) -> None:
        self.snooze_until = until
        self.stateChanged.emit()

    def _on_pull(self, event: ImagePull) -> None:
        if event.total_bytes and event.done_bytes >= event.total_bytes:
            self.pulls.pop(event.image, None)
        else:
            self.pulls[event.image] = (event.done_bytes, event.total_bytes)
        self.tasksChanged.emit()

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
        if event.image:
            self.pulls.pop(event.image, None)  # pulled, or it could not have started
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

    def _on_progress(self, event: TaskProgress) -> None:
        task = self.running.get(event.task_id)
        if task is None:
            return  # a line that arrived after its task finished
        task.progress = event
        self.tasksChanged.emit()

    def _on_delivered(self, event: ResultDelivered) -> None:
        for i, row in enumerate(self.results):
            if row.task_id == event.task_id and row.delivered is None:
                self.results[i] = ResultRow(**{**row.__dict__, "delivered": event.accepted})
                break
        if not event.accepted:
            self.add_log("error", f"Result of {event.task_id} dropped: {event.message}")
        self.resultsChanged.emit()

    def _on_error(self, event: ErrorRaised) -> None:
        details = f" ({event.details})" if event.details else ""
        self.add_log("error", f"{event.title}: {event.message}{details}")

    # ------------------------------------------------------------------ views

    @property
    def state_text(self) -> str:
        return STATE_TEXT[self.state]

    @property
    def waiting_results(self) -> int:
        """Results finished here and not yet accepted by the pool (spooled on disk)."""
        return sum(1 for r in self.results if r.delivered is None)

    def pull_text(self) -> str:
        """'Downloading python:3.12-slim: 45 of 120 MB' for the header and the tooltip."""
        if not self.pulls:
            return ""
        image, (done, total) = next(iter(self.pulls.items()))
        mb = 1_000_000
        amount = f"{done / mb:.0f} of {total / mb:.0f} MB" if total else f"{done / mb:.0f} MB"
        more = f" (and {len(self.pulls) - 1} more)" if len(self.pulls) > 1 else ""
        return f"Downloading {image}: {amount}{more}"

    def current_task_text(self) -> str:
        if not self.running:
            return "no task running"
        tasks = list(self.running.values())
        first = tasks[0].name
        if tasks[0].progress_text:
            first += f" ({tasks[0].progress_text})"
        return first if len(tasks) == 1 else f"{first} and {len(tasks) - 1} more"


@dataclass(frozen=True)
class Status:
    """The one status the header, the tray and its tooltip all show."""

    headline: str
    detail: str  # one or two short sentences, never raw library text
    details: str = ""  # the raw text, behind a Details button
    settings_action: bool = False  # the fix is in Settings
    attention: bool = False  # the person must act: the tray shows "needs attention"
    look: Look = Look.STOPPED


def describe(model: WorkerModel, address: str, cap_warning: str = "") -> Status:
    """Fold the engine state, its error kind, snooze, pulls and waiting results into words."""
    status = _describe(model, address, cap_warning)
    look = look_for(
        model.state,
        attention=status.attention,
        disconnected=model.state_kind is ErrorKind.POOL_UNREACHABLE
        and model.state in (EngineState.CONNECTING, EngineState.ERROR),
    )
    return dataclasses.replace(status, look=look)


def _describe(model: WorkerModel, address: str, cap_warning: str) -> Status:
    state = model.state
    raw = model.state_details or model.state_message
    waiting = model.waiting_results
    pending = (
        f" {plural(waiting, 'finished result')} will be sent when it is back." if waiting else ""
    )
    pull = model.pull_text()
    if state in (EngineState.ERROR, EngineState.CONNECTING) and model.state_kind is not None:
        words = for_kind(model.state_kind, address, model.retry_at)
        unreachable = model.state_kind is ErrorKind.POOL_UNREACHABLE
        return Status(
            "Disconnected" if unreachable else STATE_TEXT[EngineState.ERROR],
            words.text + (pending if unreachable else ""),
            raw,
            words.settings,
            attention=state is EngineState.ERROR,
        )
    if state is EngineState.CONNECTING:
        return Status("Connecting", f"Connecting to the pool at {address}…{pending}", raw)
    if state is EngineState.WAITING and model.policy is not None:
        # Held by the person's own rules: say which, and how it ends.
        decision = model.policy.decision
        hint = decision.hint or "it goes on by itself when that changes"
        return Status(
            f"Paused: {decision.text}",
            f"{hint[0].upper()}{hint[1:]}. Running tasks are frozen; nothing is lost.",
        )
    override = model.policy.override_until if model.policy is not None else None
    if override and state in (EngineState.IDLE, EngineState.BUSY):
        running = len(model.running)
        return Status(
            STATE_TEXT[state],
            f"Contributing anyway until {clock(override)}, whatever your rules say. "
            f"{plural(running, 'task')} running.",
        )
    if state is EngineState.PAUSED:
        if model.snooze_until is not None:
            return Status(
                f"Snoozed until {clock(model.snooze_until)}",
                f"Running tasks are frozen; contributing resumes by itself at "
                f"{clock(model.snooze_until)}.",
            )
        return Status("Paused", "Running tasks are frozen; nothing is lost. Resume when you like.")
    if state is EngineState.IDLE:
        if cap_warning:
            return Status("Contributing: no task fits", cap_warning, settings_action=True,
                          attention=True)  # fmt: skip
        return Status(STATE_TEXT[state], pull or "Connected; waiting for the pool to send a task.")
    if state is EngineState.BUSY:
        running = len(model.running)
        text = f"{plural(running, 'task')} running." if running else "Starting a task."
        return Status(STATE_TEXT[state], f"{text} {pull}".strip())
    if state is EngineState.DRAINING:
        return Status(
            STATE_TEXT[state],
            f"Finishing {plural(len(model.running), 'task')}; taking no new ones.",
        )
    if state is EngineState.ERROR:
        return Status(STATE_TEXT[state], "The worker stopped.", raw, attention=True)
    return Status(STATE_TEXT[state], "Press Start contributing to give this computer's spare time.")
