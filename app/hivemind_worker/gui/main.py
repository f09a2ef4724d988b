"""The desktop app's start: the QApplication, one instance, the windows, then the main loop."""

from __future__ import annotations

import contextlib
import logging
import signal
import socket
import sys

from PySide6.QtCore import QSocketNotifier, Qt, QTimer
from PySide6.QtWidgets import QApplication

from hivemind_worker.config import Settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.gui.app import WorkerApp, should_start
from hivemind_worker.gui.icons import app_icon
from hivemind_worker.gui.single_instance import SingleInstance, instance_name
from hivemind_worker.paths import Paths
from hivemind_worker.wiring import make_engine

log = logging.getLogger(__name__)


def make_qapplication(argv: list[str] | None = None) -> QApplication:
    app = QApplication.instance()
    if isinstance(app, QApplication):
        return app
    # High-DPI: Qt 6 scales by default; pass fractional factors through instead of rounding.
    QApplication.setHighDpiScaleFactorRoundingPolicy(
        Qt.HighDpiScaleFactorRoundingPolicy.PassThrough
    )
    app = QApplication(argv or [sys.argv[0]])
    app.setApplicationName("HiveMind Worker")
    app.setOrganizationName("HiveMind")
    app.setDesktopFileName("hivemind-worker")
    app.setWindowIcon(app_icon())
    app.setQuitOnLastWindowClosed(False)  # the tray keeps the app alive
    return app


def run_gui(
    settings: Settings,
    paths: Paths,
    *,
    hidden: bool = False,
    demo_tasks: int | None = None,
) -> int:
    """The desktop app's main loop; returns the exit code."""
    app = make_qapplication()
    single = SingleInstance(instance_name(paths))
    if single.forward_to_running():
        print("HiveMind Worker is already running; its window was brought forward.")
        return 0
    single.listen()
    credentials = CredentialStore(paths)
    engine = make_engine(
        settings, paths, credentials, demo=demo_tasks is not None, choose_executor_at_start=True
    )
    before = after = None
    autostart_engine = should_start(settings, paths)
    window: list[WorkerApp] = []
    if demo_tasks is not None:
        from hivemind_worker.demo import DemoPool

        demo = DemoPool(paths, demo_tasks)
        autostart_engine = True

        async def before() -> None:
            window[0].set_settings_from_loop(await demo.start(settings, credentials))

        async def after() -> None:
            await demo.stop()

    worker_app = WorkerApp(
        settings,
        paths,
        credentials,
        engine,
        autostart_engine=autostart_engine,
        before=before,
        after=after,
        demo=demo_tasks is not None,
    )
    window.append(worker_app)
    single.activated.connect(worker_app.dashboard.show_and_raise)
    _quit_on_signals(worker_app)
    if not paths.settings_file.exists() and demo_tasks is None:
        worker_app.open_setup()  # the first run: the setup flow instead of the dashboard
        hidden = True
    worker_app.start_engine(show_dashboard=not hidden)
    return app.exec()


def _quit_on_signals(worker_app: WorkerApp) -> None:
    """Ctrl-C or SIGTERM (a terminal, a session ending) quit as the menu does: drain first."""

    def on_signal(signum: int, frame: object) -> None:
        log.info("signal %d: quitting", signum)
        if worker_app.quitting:
            worker_app.engine.shutdown()  # a second signal: stop now
        else:
            worker_app.quit()

    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(ValueError, OSError):  # not the main thread, or no such signal
            signal.signal(sig, on_signal)
    # Python runs signal handlers only between bytecodes; while Qt's C++ loop waits, nothing
    # runs. The C-level handler writes the signal's number to a socket Qt watches, and the
    # notifier's (empty) slot hands control to Python, which then runs on_signal: no timer
    # waking the app a few times a second for nothing.
    reader, writer = socket.socketpair()
    reader.setblocking(False)
    writer.setblocking(False)
    try:
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
    except (ValueError, OSError):  # not the main thread: a timer as before
        timer = QTimer(worker_app)
        timer.timeout.connect(lambda: None)
        timer.start(250)
        return
    notifier = QSocketNotifier(reader.fileno(), QSocketNotifier.Type.Read, worker_app)

    def drain() -> None:
        with contextlib.suppress(OSError):
            reader.recv(64)

    notifier.activated.connect(drain)
    worker_app._signal_wakeup = (reader, writer, notifier)  # type: ignore[attr-defined]  # kept alive
