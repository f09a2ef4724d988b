"""The desktop app: one instance per user, the engine on its thread, tray, dashboard, settings."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from PySide6.QtCore import QByteArray, QObject, Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QApplication,
    QMessageBox,
    QProgressBar,
    QProgressDialog,
    QSystemTrayIcon,
)

from hivemind_worker import __version__
from hivemind_worker.config import Settings, read_state, save_settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.engine.engine import WorkerEngine
from hivemind_worker.engine.events import EngineState, ErrorRaised, SandboxChosen
from hivemind_worker.errors import ErrorKind
from hivemind_worker.gui.autostart import autostart
from hivemind_worker.gui.dashboard import Dashboard
from hivemind_worker.gui.engine_thread import (
    Bridge,
    CrashReporter,
    EngineThread,
    install_excepthooks,
)
from hivemind_worker.gui.first_run import FirstRunWizard
from hivemind_worker.gui.model import Status, WorkerModel, describe
from hivemind_worker.gui.settings_dialog import SettingsDialog
from hivemind_worker.gui.tray import Tray, needs_person
from hivemind_worker.gui.words import cap_warning, for_kind
from hivemind_worker.paths import Paths

log = logging.getLogger(__name__)

SNOOZE_CHECK_MS = 15_000
NOTIFY_AGAIN_SECONDS = 600.0
CONTRIBUTING_KEY = "contributing"  # in the state file: resume contributing at the next start


def was_contributing(paths: Paths) -> bool:
    """Whether the person left the app contributing (quitting keeps it; Stop and sign-out end
    it), so that the next start, at login say, carries on."""
    return read_state(paths).get(CONTRIBUTING_KEY) is True


def should_start(settings: Settings, paths: Paths) -> bool:
    return settings.start_on_launch or was_contributing(paths)


class WorkerApp(QObject):
    """Wires the engine thread, the model and the windows; routes every command."""

    quitFinished = Signal()
    settingsChangedOnLoop = Signal(object)  # Settings, from a hook running on the engine loop

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        credentials: CredentialStore,
        engine: WorkerEngine,
        *,
        autostart_engine: bool,
        before: Callable[[], Awaitable[None]] | None = None,
        after: Callable[[], Awaitable[None]] | None = None,
        show_tray: bool = True,
        exit_on_quit: bool = True,
        demo: bool = False,
    ) -> None:
        super().__init__()
        self.exit_on_quit = exit_on_quit  # tests keep their QApplication alive
        self.demo = demo
        self.file_settings = settings  # what settings.toml holds, before any demo pool
        self.settings = settings
        self.paths = paths
        self.credentials = credentials
        self.engine = engine
        self.bridge = Bridge()
        self.reporter = CrashReporter()
        self.reporter.crashed.connect(self.show_crash)
        self.bridge.crashed.connect(self.show_crash)
        self.model = WorkerModel(self.bridge, paths)
        self.engine_thread = EngineThread(
            engine, self.bridge, autostart=autostart_engine, before=before, after=after
        )
        self.signed_out = False  # the person signed out: no account until they sign in again
        self.dashboard = Dashboard(
            self.model, close_to_tray=self._close_to_tray, status=self.status
        )
        self.tray = Tray(self.model, status=self.status)
        self.show_tray = show_tray and QSystemTrayIcon.isSystemTrayAvailable()
        self.settings_dialog: SettingsDialog | None = None
        self.setup: FirstRunWizard | None = None
        self.override_box: QMessageBox | None = None
        self._notified: dict[ErrorKind, float] = {}  # kind -> when the tray last said it
        self.progress: QProgressDialog | None = None
        self.quitting = False
        self.snooze_until: float | None = None
        self._snooze_timer = QTimer(self)
        self._snooze_timer.setInterval(SNOOZE_CHECK_MS)  # wall clock: survives suspend
        self._snooze_timer.timeout.connect(self._check_snooze)
        self._connect()
        self._restore_geometry()
        self._update_connection()

    def _connect(self) -> None:
        d, t = self.dashboard, self.tray
        for source, slot in (
            (d.startRequested, self.start),
            (t.startRequested, self.start),
            (d.pauseRequested, self.pause),
            (t.pauseRequested, self.pause),
            (d.resumeRequested, self.resume),
            (t.resumeRequested, self.resume),
            (d.stopRequested, self.stop),
            (t.stopRequested, self.stop),
            (d.settingsRequested, self.open_settings),
            (t.settingsRequested, self.open_settings),
            (d.quitRequested, self.quit),
            (t.quitRequested, self.quit),
            (t.dashboardRequested, self.dashboard.show_and_raise),
            (t.toggleDashboard, self.toggle_dashboard),
        ):
            source.connect(slot)
        d.cancelRequested.connect(self.cancel_task)
        d.setupRequested.connect(self.open_setup)
        d.geometryChanged.connect(self._save_geometry)
        # Live metrics (a sample a second) only while the dashboard shows.
        d.watchingChanged.connect(self.engine.watch_metrics)
        t.snoozeRequested.connect(self.snooze)
        self.bridge.error.connect(self._on_error)
        self.bridge.sandboxChosen.connect(self._on_sandbox_chosen)
        self.bridge.engineStopped.connect(self._on_engine_stopped)
        self.model.stateChanged.connect(self._update_connection)
        self.model.tasksChanged.connect(self.dashboard._update_state)
        self.model.stateChanged.connect(self.dashboard._update_results)
        self.settingsChangedOnLoop.connect(self._on_settings_from_loop)

    # ------------------------------------------------------------------ lifecycle

    def start_engine(self, *, show_dashboard: bool = True) -> None:
        install_excepthooks(self.reporter)
        self.engine_thread.start()
        if self.show_tray:
            self.tray.show()
        if show_dashboard or (not self.show_tray and self.setup is None):
            self.dashboard.show_and_raise()

    def toggle_dashboard(self) -> None:
        if self.dashboard.isVisible() and not self.dashboard.isMinimized():
            self._save_geometry(self.dashboard.saveGeometry())
            self.dashboard.hide()
        else:
            self.dashboard.show_and_raise()

    def _close_to_tray(self) -> bool:
        return self.settings.close_to_tray and self.show_tray and not self.quitting

    def quit(self) -> None:
        """Drain with a visible progress dialog and a time limit, then end the app."""
        if self.quitting:
            return
        self.quitting = True
        self._save_geometry(self.dashboard.saveGeometry())
        if not self.engine_thread.isRunning():
            self._finish_quit()
            return
        limit = max(1, self.settings.drain_timeout)
        running = len(self.model.running)
        self.progress = QProgressDialog(
            f"Finishing {running} running task(s) before quitting…"
            if running
            else "Disconnecting from the pool…",
            "Stop &now",
            0,
            limit,
            self.dashboard if self.dashboard.isVisible() else None,
        )
        self.progress.setWindowTitle("Quitting HiveMind Worker")
        # The label says how long is left; a percentage on the bar would only straddle it.
        bar = QProgressBar(self.progress)
        bar.setTextVisible(False)
        self.progress.setBar(bar)
        self.progress.setWindowModality(Qt.WindowModality.ApplicationModal)
        self.progress.setMinimumDuration(0)
        self.progress.setAutoClose(False)
        self.progress.setAutoReset(False)
        self.progress.canceled.connect(self.engine.shutdown)
        self.progress.show()
        started = time.monotonic()

        def tick() -> None:
            if self.progress is None:
                return
            elapsed = time.monotonic() - started
            self.progress.setValue(min(limit, int(elapsed)))
            left = len(self.model.running)
            if left:
                self.progress.setLabelText(
                    f"Finishing {left} running task(s) before quitting… "
                    f"({max(0, limit - int(elapsed))} s left)"
                )
            # A stuck engine must not keep the app alive forever.
            if elapsed > limit + 20:
                log.error("the engine did not stop in time; quitting anyway")
                self._finish_quit()

        self._progress_timer = QTimer(self)
        self._progress_timer.timeout.connect(tick)
        self._progress_timer.start(250)
        self.engine.drain_and_shutdown(limit)

    def _on_engine_stopped(self) -> None:
        if self.quitting:
            self._finish_quit()
        else:
            self.model.add_log("error", "The worker engine stopped.")

    def _finish_quit(self) -> None:
        if self.progress is not None:
            self.progress.close()
            self.progress = None
        self.engine_thread.wait(5000)
        self.tray.hide()
        self.model.flush()
        self.dashboard.allow_close = True
        self.quitFinished.emit()
        app = QApplication.instance()
        if app is not None and self.exit_on_quit:
            # exit(), not quit(): Qt 6's quit() first asks every window to close, and the
            # dashboard refuses (it hides to the tray), which would cancel the quit.
            app.exit(0)

    def dispose(self) -> None:
        """Delete the windows through Qt, not the garbage collector (for tests and re-creation).

        Qt objects torn down by Python's GC in arbitrary order can crash; deleteLater runs
        the C++ destructors in the event loop, children after parents are detached.
        """
        self.tray.hide()
        if self.settings_dialog is not None:
            self.settings_dialog.deleteLater()
            self.settings_dialog = None
        if self.setup is not None:
            self.setup.deleteLater()
            self.setup = None
        self.tray.menu.deleteLater()
        self.dashboard._tick.stop()
        self.dashboard.deleteLater()

    # ------------------------------------------------------------------ commands

    def status(self) -> Status:
        """What the header, the tray icon and its tooltip show, all from one place."""
        return describe(self.model, self.settings.node_pool_address, cap_warning(self.settings))

    def _remember_contributing(self, on: bool) -> None:
        def put(state: dict[str, Any]) -> None:
            state[CONTRIBUTING_KEY] = on

        self.model.write_state(put)

    def start(self) -> None:
        self._set_snooze(None)
        self.signed_out = False
        self.engine.start()
        self._remember_contributing(True)
        if self.model.state is EngineState.PAUSED:
            self.engine.resume()

    def pause(self) -> None:
        self.engine.pause()

    def resume(self) -> None:
        if self.model.state is EngineState.WAITING and self.model.policy is not None:
            self.offer_contribute_anyway()  # the person's rules hold it, not a pause
            return
        self._set_snooze(None)
        self.engine.resume()

    def offer_contribute_anyway(self) -> None:
        """Say what holds the tasks, and offer to contribute anyway for an hour."""
        policy = self.model.policy
        assert policy is not None  # only offered while the policy holds the tasks
        decision = policy.decision
        hint = f" ({decision.hint})" if decision.hint else ""
        box = QMessageBox(
            QMessageBox.Icon.Question,
            "HiveMind Worker",
            f"Paused: {decision.text}{hint}.",
            parent=self.dashboard if self.dashboard.isVisible() else None,
        )
        box.setInformativeText(
            "Your rules for when to contribute are holding the tasks. You can contribute "
            "anyway for an hour; after that your rules apply again."
        )
        anyway = box.addButton("Contribute anyway for 1 &hour", QMessageBox.ButtonRole.AcceptRole)
        box.addButton("&Keep waiting", QMessageBox.ButtonRole.RejectRole)
        box.setDefaultButton(anyway)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)

        def answered() -> None:
            self.override_box = None
            if box.clickedButton() is anyway:
                self.engine.contribute_anyway(3600)
                self.model.add_log("state", "Contributing anyway for 1 hour")

        box.finished.connect(answered)
        self.override_box = box
        box.open()

    def stop(self) -> None:
        self._set_snooze(None)
        self.engine.stop()
        self._remember_contributing(False)

    def cancel_task(self, task_id: str) -> None:
        name = self.model.running[task_id].name if task_id in self.model.running else task_id
        self.model.add_log("task", f"Cancelling {name}; the pool will not send it here again")
        self.engine.cancel_task(task_id)

    def _set_snooze(self, until: float | None) -> None:
        self.snooze_until = until
        if until is None:
            self._snooze_timer.stop()
        self.model.set_snooze(until)

    def snooze(self, seconds: float) -> None:
        self.engine.pause()
        self._set_snooze(time.time() + seconds)
        self._snooze_timer.start()
        until = time.strftime("%H:%M", time.localtime(time.time() + seconds))
        self.model.add_log("state", f"Snoozed until {until}")

    def _check_snooze(self) -> None:
        if self.snooze_until is not None and time.time() >= self.snooze_until:
            self.model.add_log("state", "Snooze over")
            self.resume()

    def open_settings(self) -> None:
        if self.settings_dialog is None:
            self.settings_dialog = SettingsDialog(
                self.settings,
                self.paths,
                self.credentials,
                self.engine_thread,
                set_autostart=lambda on: autostart(self.paths).set_enabled(on),
                persist=self._persist,
                parent=self.dashboard,
            )
            self.settings_dialog.applied.connect(self.apply_settings)
            self.settings_dialog.loginChanged.connect(self._on_login_changed)
            self.settings_dialog.finished.connect(self._forget_settings_dialog)
        else:
            self.settings_dialog.load(self.settings)
        self.settings_dialog.show_docker_status(*self._sandbox())
        self.settings_dialog.show()
        self.settings_dialog.raise_()
        self.settings_dialog.activateWindow()

    def open_setup(self) -> None:
        """The first-run flow; also from the menu, to set up again."""
        if self.setup is None:
            self.setup = FirstRunWizard(
                self.settings,
                self.paths,
                self.credentials,
                self.engine_thread,
                self._sandbox()[0],
                parent=None,
            )
            self.setup.completed.connect(self._on_setup_done)
            self.setup.finished.connect(self._forget_setup)
        self.setup.show()
        self.setup.raise_()
        self.setup.activateWindow()

    def _forget_setup(self) -> None:
        if self.setup is not None:
            self.setup.deleteLater()
            self.setup = None
        if not self.quitting:  # finished or cancelled: the dashboard is where things are
            self.dashboard.show_and_raise()

    def _on_setup_done(self, settings: Settings, start_now: bool) -> None:
        try:
            self._persist(settings)
            autostart(self.paths).set_enabled(settings.start_at_login)
        except OSError as exc:
            log.error("could not save the settings from the first-run flow: %s", exc)
            self.model.add_log("error", f"Could not save the settings: {exc}")
        self.signed_out = False
        self.apply_settings(settings)
        if start_now:
            self.start()
        self.dashboard.show_and_raise()

    def _persist(self, settings: Settings) -> None:
        if self.demo:
            # The demo's pool lives only as long as the demo: keep the person's own pool.
            settings = dataclasses.replace(
                settings,
                node_pool_address=self.file_settings.node_pool_address,
                account=self.file_settings.account,
            )
        save_settings(self.paths, settings)

    def _forget_settings_dialog(self) -> None:
        if self.settings_dialog is not None:
            self.settings_dialog.deleteLater()
            self.settings_dialog = None

    def apply_settings(self, settings: Settings) -> None:
        self.settings = settings
        self.engine.apply_settings(settings)
        self._update_connection()
        self.model.stateChanged.emit()  # the header re-checks the caps
        self.model.add_log("state", "Settings applied")

    def _on_login_changed(self, account: str) -> None:
        if account:
            self.signed_out = False
            self.apply_settings(dataclasses.replace(self.settings, account=account))
            return
        # Signed out: take no new task, let running ones finish and deliver (the session
        # stays up for that), then stop. Starting again needs a new sign-in.
        self.signed_out = True
        self._remember_contributing(False)
        if self.model.state is not EngineState.STOPPED:
            self.engine.drain()
        self.model.add_log("state", "Signed out: no new tasks; running ones finish")
        self._update_connection()

    def _on_settings_from_loop(self, settings: Settings) -> None:
        self.settings = settings
        self._update_connection()

    def set_settings_from_loop(self, settings: Settings) -> None:
        """For hooks on the engine loop (the demo's pool): the engine and the GUI both learn it."""
        self.engine.apply_settings(settings)
        self.settingsChangedOnLoop.emit(settings)

    # ------------------------------------------------------------------ feedback

    def _update_connection(self) -> None:
        s = self.settings
        account = "signed out" if self.signed_out or not s.account else f"signed in as {s.account}"
        sandbox = {
            "docker": "tasks run in Docker containers",
            "": "looking for Docker",
        }.get(self._sandbox()[0], "tasks run in the process sandbox")
        self.dashboard.set_connection(
            f"Pool {s.node_pool_address} · {account} · {sandbox} · v{__version__}"
        )

    def _sandbox(self) -> tuple[str, str]:
        """The executor's capability and notice; ("", "") until the engine has chosen it."""
        executor = self.engine.executor_ready
        return (executor.capability, executor.notice) if executor else ("", "")

    def _on_sandbox_chosen(self, event: SandboxChosen) -> None:
        self._update_connection()
        if self.settings_dialog is not None:
            self.settings_dialog.show_docker_status(event.capability, event.notice)
        if self.setup is not None:
            self.setup.docker.set_capability(event.capability)

    def _on_error(self, event: ErrorRaised) -> None:
        # One balloon per kind of trouble in a while: 24 tasks that cannot get their image
        # are one problem to the person, not 24 notifications.
        now = time.monotonic()
        last = self._notified.get(event.kind)
        if last is not None and now - last < NOTIFY_AGAIN_SECONDS:
            return
        if needs_person(event):
            self._notified[event.kind] = now
            # Words from the kind; the engine's own text is in the event log and the log file.
            words = for_kind(event.kind, self.settings.node_pool_address)
            self.tray.notify(event.title, words.text)

    def show_crash(self, title: str, details: str) -> None:
        self.model.add_log("error", f"{title}: {details.strip().splitlines()[-1]}")
        self.tray.notify(title, "Details are in the event log and the log file.")
        box = QMessageBox(QMessageBox.Icon.Critical, "HiveMind Worker", title, parent=None)
        box.setInformativeText("The error was written to the log file. The app keeps running.")
        box.setDetailedText(details)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.show()  # not exec(): a crash report must not block the GUI thread

    # ------------------------------------------------------------------ geometry

    def _restore_geometry(self) -> None:
        raw = read_state(self.paths).get("gui", {})
        geometry = raw.get("geometry") if isinstance(raw, dict) else None
        if isinstance(geometry, str):
            with contextlib.suppress(ValueError):
                self.dashboard.restoreGeometry(QByteArray(base64.b64decode(geometry)))

    def _save_geometry(self, geometry: QByteArray) -> None:
        encoded = base64.b64encode(bytes(geometry.data())).decode("ascii")

        def put(state: dict[str, Any]) -> None:
            gui = state.get("gui")
            state["gui"] = {**(gui if isinstance(gui, dict) else {}), "geometry": encoded}

        self.model.write_state(put)
