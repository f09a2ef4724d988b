"""EngineThread hosts the engine's event loop; Bridge re-emits engine events as Qt signals."""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import sys
import threading
import traceback
from collections.abc import Awaitable, Callable, Coroutine
from types import TracebackType
from typing import Any

import shiboken6
from PySide6.QtCore import QObject, QThread, QTimer, Signal

from hivemind_worker.engine.engine import WorkerEngine
from hivemind_worker.engine.events import (
    ErrorRaised,
    Event,
    ImagePull,
    MetricsSample,
    PolicyChanged,
    ResultDelivered,
    SandboxChosen,
    StateChanged,
    TaskFinished,
    TaskOutput,
    TaskProgress,
    TaskStarted,
)
from hivemind_worker.errors import HiveMindError

log = logging.getLogger(__name__)

Hook = Callable[[], Awaitable[None]]


class Bridge(QObject):
    """Lives on the GUI thread; the engine calls `publish` on its own thread.

    Emitting a signal of a GUI-thread object from another thread queues the call, so every
    slot connected here runs on the GUI thread (the Electrum pattern).
    """

    anyEvent = Signal(object)  # every event, whatever its type (not `event`: QObject.event)
    stateChanged = Signal(object)  # StateChanged
    sandboxChosen = Signal(object)  # SandboxChosen: Docker or the process sandbox, at start
    metrics = Signal(object)  # MetricsSample
    taskStarted = Signal(object)  # TaskStarted
    imagePull = Signal(object)  # ImagePull
    taskOutput = Signal(object)  # TaskOutput
    taskProgress = Signal(object)  # TaskProgress: epoch k of n, or its environment's build
    taskFinished = Signal(object)  # TaskFinished
    resultDelivered = Signal(object)  # ResultDelivered
    error = Signal(object)  # ErrorRaised
    policyChanged = Signal(object)  # PolicyChanged: the when-to-contribute decision
    crashed = Signal(str, str)  # title, details: an uncaught exception anywhere
    engineStopped = Signal()  # engine.run() returned: the thread is about to end

    def publish(self, event: Event) -> None:
        name = SIGNALS.get(type(event))
        if name is None:
            # A new event type nobody mapped: said loudly, and still on `anyEvent`.
            log.error("the GUI has no signal for %s events", type(event).__name__)
        else:
            getattr(self, name).emit(event)
        self.anyEvent.emit(event)


# One signal per event type; a test checks that every member of `Event` is here.
SIGNALS: dict[type, str] = {
    StateChanged: "stateChanged",
    SandboxChosen: "sandboxChosen",
    MetricsSample: "metrics",
    TaskStarted: "taskStarted",
    ImagePull: "imagePull",
    TaskOutput: "taskOutput",
    TaskProgress: "taskProgress",
    TaskFinished: "taskFinished",
    ResultDelivered: "resultDelivered",
    PolicyChanged: "policyChanged",
    ErrorRaised: "error",
}


class EngineThread(QThread):
    """Runs `engine.run()` under its own asyncio loop; the GUI thread never awaits anything.

    `before` runs on the loop ahead of the engine (the demo starts its pool and submits tasks
    there), `after` once the engine has stopped. Both share the engine's loop because grpc.aio
    objects belong to the loop that made them.
    """

    def __init__(
        self,
        engine: WorkerEngine,
        bridge: Bridge,
        *,
        autostart: bool,
        before: Hook | None = None,
        after: Hook | None = None,
    ) -> None:
        super().__init__()
        self.setObjectName("engine")
        self.engine = engine
        self.bridge = bridge
        self.autostart = autostart
        self._before = before
        self._after = after
        self._loop: asyncio.AbstractEventLoop | None = None
        self._ready = threading.Event()
        self._unsubscribe = engine.subscribe(bridge.publish)

    def run(self) -> None:
        try:
            asyncio.run(self._main())
        except BaseException:
            exc_type, exc, tb = sys.exc_info()
            assert exc_type is not None and exc is not None
            log.critical("the engine thread failed", exc_info=(exc_type, exc, tb))
            self.bridge.crashed.emit(
                "The worker engine stopped", "".join(traceback.format_exception(exc))
            )
        finally:
            self._unsubscribe()
            self._loop = None
            self._ready.set()
            self.bridge.engineStopped.emit()

    async def _main(self) -> None:
        self._loop = asyncio.get_running_loop()
        self._ready.set()
        try:
            if self._before is not None:
                await self._before()
            await self.engine.run(autostart=self.autostart)
        finally:
            if self._after is not None:
                await self._after()

    def submit(self, coro: Coroutine[Any, Any, Any]) -> concurrent.futures.Future[Any]:
        """Schedule a coroutine on the engine's loop (pool calls, keyring via to_thread)."""
        if self.isRunning():
            self._ready.wait(10)  # only waits in the instant between start() and the loop
        loop = self._loop
        if loop is None or loop.is_closed():
            coro.close()
            future: concurrent.futures.Future[Any] = concurrent.futures.Future()
            future.set_exception(RuntimeError("the worker engine is not running"))
            return future
        return asyncio.run_coroutine_threadsafe(coro, loop)


class Call(QObject):
    """The outcome of work done off the GUI thread, delivered as a signal on the GUI thread.

    `succeeded` carries no argument; the slot reads `value`. Passing Python objects (None in
    particular) through a queued Signal(object) has hit reference-count bugs in PySide6.
    """

    succeeded = Signal()
    failed = Signal(str)

    def __init__(
        self,
        future: concurrent.futures.Future[Any],
        on_ok: Callable[[Any], None],
        on_fail: Callable[[str], None],
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.future = future
        self.value: Any = None
        # Connected before the callback is added: a future that is already done calls back
        # at once, and an emit before connect() would be lost.
        self.succeeded.connect(lambda: on_ok(self.value))
        self.failed.connect(on_fail)
        # The callback runs on whichever thread finishes the future; the signal queues it here.
        future.add_done_callback(self._done)

    def _done(self, future: concurrent.futures.Future[Any]) -> None:
        if future.cancelled():
            self.failed.emit("cancelled")
            return
        exc = future.exception()
        if exc is None:
            self.value = future.result()
            self.succeeded.emit()
        elif isinstance(exc, HiveMindError):
            if exc.details:
                log.warning("%s (%s)", exc.message, exc.details)
            self.failed.emit(exc.message)
        else:  # a bug: the person gets one sentence, the log the traceback
            log.error("background call failed", exc_info=exc)
            self.failed.emit(f"Something went wrong ({type(exc).__name__}); see the log.")


class Calls:
    """A window's calls in flight on the engine's loop, each kept alive until it answers.

    `run` hands a coroutine to the engine thread and calls `on_ok(value)` or `on_fail(one
    sentence)` back on the GUI thread; the window never waits.
    """

    def __init__(self, engine_thread: EngineThread, owner: QObject) -> None:
        self._engine_thread = engine_thread
        self._owner = owner
        self._pending: set[Call] = set()

    def run(
        self,
        coro: Coroutine[Any, Any, Any],
        on_ok: Callable[[Any], None],
        on_fail: Callable[[str], None],
    ) -> Call:
        calls: list[Call] = []
        finished: list[bool] = []

        def finish(handler: Callable[[Any], None], value: Any) -> None:
            finished.append(True)
            for call in calls:  # dropped once this slot has returned, not inside its dispatch
                QTimer.singleShot(0, lambda c=call: self._pending.discard(c))
            if shiboken6.isValid(self._owner):  # the window may have closed meanwhile
                handler(value)

        # No Qt parent: a window closed while the call is in flight must not delete the Call
        # under the engine thread, which emits on it when the answer comes (that crashed the
        # app: a signal emitted on a deleted QObject). Python keeps it until it answers.
        call = Call(
            self._engine_thread.submit(coro),
            lambda value: finish(on_ok, value),
            lambda message: finish(on_fail, message),
        )
        calls.append(call)
        if not finished:  # an answer already in hand needs no keeping
            self._pending.add(call)
        return call


class CrashReporter(QObject):
    """Receives uncaught exceptions from any thread and shows them on the GUI thread."""

    crashed = Signal(str, str)


_reporter: CrashReporter | None = None


def install_excepthooks(reporter: CrashReporter) -> None:
    """Chain onto the logging hooks (logs.setup_logging): log as before, then tell the person."""
    global _reporter  # noqa: PLW0603 - one per process, like sys.excepthook itself
    _reporter = reporter
    previous_sys = sys.excepthook
    previous_thread = threading.excepthook

    def on_exception(
        exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
    ) -> None:
        previous_sys(exc_type, exc, tb)
        if not issubclass(exc_type, KeyboardInterrupt) and _reporter is not None:
            text = "".join(traceback.format_exception(exc_type, exc, tb))
            _reporter.crashed.emit(f"Unexpected error: {exc_type.__name__}", text)

    def on_thread_exception(args: threading.ExceptHookArgs) -> None:
        previous_thread(args)
        if issubclass(args.exc_type, SystemExit) or _reporter is None:
            return
        text = "".join(
            traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback)
        )
        name = args.thread.name if args.thread is not None else "a thread"
        _reporter.crashed.emit(f"Unexpected error in {name}", text)

    sys.excepthook = on_exception
    threading.excepthook = on_thread_exception
