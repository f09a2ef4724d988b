"""Plain dataclass events the engine publishes to its subscribers (the GUI bridge, the CLI)."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from threading import Lock

from hivemind_worker.engine.executors.base import Usage
from hivemind_worker.engine.monitor import HostSample
from hivemind_worker.engine.policy import Decision
from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.tasks import Resources, TaskStatus

log = logging.getLogger(__name__)


class EngineState(StrEnum):
    STOPPED = "stopped"
    CONNECTING = "connecting"
    IDLE = "idle"
    BUSY = "busy"
    PAUSED = "paused"
    WAITING = "waiting"  # the policy says not now; StateChanged.message says why
    DRAINING = "draining"
    ERROR = "error"


@dataclass(frozen=True)
class StateChanged:
    state: EngineState
    message: str = ""
    retry_at: float | None = None  # epoch seconds: next attempt (CONNECTING, ERROR); end (WAITING)
    error_kind: ErrorKind | None = None  # why, in CONNECTING or ERROR
    details: str = ""  # the raw library text behind `message`, for a Details box and the log


@dataclass(frozen=True)
class SandboxChosen:
    """Where tasks will run, once the engine has chosen (at the start of run())."""

    capability: str  # "docker" or "process"
    notice: str = ""  # why not Docker, when Docker was wanted but is not usable


@dataclass(frozen=True)
class MetricsSample:
    host: HostSample
    tasks: dict[str, Usage] = field(default_factory=dict)


@dataclass(frozen=True)
class TaskStarted:
    task_id: str
    lease_id: str
    name: str
    kind: str
    image: str
    resources: Resources
    attempt: int


@dataclass(frozen=True)
class ImagePull:
    """Progress of an image the executor is pulling for a task about to start."""

    image: str
    done_bytes: int
    total_bytes: int  # 0 until the registry has said how large the layers are


@dataclass(frozen=True)
class TaskOutput:
    task_id: str
    text: str


@dataclass(frozen=True)
class TaskProgress:
    """How far a runner task is ("epoch 3 of 10"), parsed from its progress lines; also the
    first-use build of its environment (unit "environment", what is happening in `text`)."""

    task_id: str
    step: int
    steps: int
    unit: str  # "epoch", "fold", "step", "image", "document", "environment", ...
    metric: str = ""
    value: float | None = None
    text: str = ""

    def label(self) -> str:
        """What the dashboard shows, e.g. "epoch 3 of 10, loss 0.412"."""
        if self.unit == "environment":
            return f"preparing: {self.text}"[:120]
        shown = f"{self.unit} {self.step} of {self.steps}" if self.steps else self.unit
        if self.metric and self.value is not None:
            shown += f", {self.metric} {self.value:.4g}"
        return shown


@dataclass(frozen=True)
class TaskFinished:
    task_id: str
    lease_id: str
    name: str
    status: TaskStatus
    exit_code: int
    error: str
    duration: float
    result_size: int
    cpu_seconds: float = 0.0


@dataclass(frozen=True)
class ResultDelivered:
    task_id: str
    lease_id: str
    accepted: bool  # False: the pool refused it (stale lease) and it was dropped
    message: str = ""


@dataclass(frozen=True)
class PolicyChanged:
    """The when-to-contribute decision changed, or tasks were given back under it.

    `decision` has the verdict (run / throttle / suspend), the reason code and its words,
    since when, and until when if known (`resume_at`) with a hint ("resumes when plugged
    in"). `manual_pause`: a manual pause holds the tasks whatever the policy says.
    `override_until`: "contribute anyway" is in force until then (epoch seconds).
    """

    decision: Decision
    line: str  # the one line the headless log writes: "suspended: on battery — resumes ..."
    manual_pause: bool = False
    override_until: float | None = None
    given_back: int = 0  # tasks just given back to the pool after a long suspension


@dataclass(frozen=True)
class ErrorRaised:
    """An error the person may need to see; front-ends choose wording from `kind`."""

    title: str
    message: str
    kind: ErrorKind = ErrorKind.INTERNAL
    details: str = ""
    needs_action: bool = False

    @classmethod
    def of(cls, error: HiveMindError) -> ErrorRaised:
        return cls(error.title, error.message, error.kind, error.details, error.needs_action)


Event = (
    StateChanged
    | SandboxChosen
    | MetricsSample
    | TaskStarted
    | ImagePull
    | TaskOutput
    | TaskProgress
    | TaskFinished
    | ResultDelivered
    | PolicyChanged
    | ErrorRaised
)
Subscriber = Callable[[Event], None]


class EventHub:
    """Calls every subscriber in turn; a subscriber's exception is logged, never propagated."""

    def __init__(self) -> None:
        self._subscribers: list[Subscriber] = []
        self._lock = Lock()

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        with self._lock:
            self._subscribers.append(callback)

        def unsubscribe() -> None:
            with self._lock:
                if callback in self._subscribers:
                    self._subscribers.remove(callback)

        return unsubscribe

    def publish(self, event: Event) -> None:
        with self._lock:
            subscribers = list(self._subscribers)
        for callback in subscribers:
            try:
                callback(event)
            except Exception:
                log.exception("event subscriber %r failed on %s", callback, type(event).__name__)
