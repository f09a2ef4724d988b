"""The tray icon: the state at a glance, live numbers in the tooltip, and the menu."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime, timedelta

from PySide6.QtCore import QObject, QTimer, Signal, SignalInstance
from PySide6.QtGui import QAction
from PySide6.QtWidgets import QMenu, QSystemTrayIcon

from hivemind_worker.engine.events import EngineState, ErrorRaised
from hivemind_worker.gui.icons import Look, state_icon
from hivemind_worker.gui.model import Status, WorkerModel, describe
from hivemind_worker.gui.words import human_bytes

# The tooltip's numbers change with every metric sample; it is rebuilt at most this often,
# and handed to the tray only when its text changed (each hand-over is a D-Bus signal or an
# X property write for the tray host).
TOOLTIP_BATCH_MS = 1000


def needs_person(event: ErrorRaised) -> bool:
    """Notify only for errors the person has to act on: a property of the error's kind."""
    return event.needs_action


def tomorrow_morning(now: datetime | None = None) -> datetime:
    now = now or datetime.now()
    return (now + timedelta(days=1)).replace(hour=8, minute=0, second=0, microsecond=0)


class Tray(QObject):
    """Owns the QSystemTrayIcon and its menu; commands leave as signals for the app to route."""

    startRequested = Signal()
    pauseRequested = Signal()
    resumeRequested = Signal()
    snoozeRequested = Signal(float)  # seconds
    dashboardRequested = Signal()
    toggleDashboard = Signal()
    settingsRequested = Signal()
    quitRequested = Signal()

    stopRequested = Signal()

    def __init__(
        self,
        model: WorkerModel,
        status: Callable[[], Status] | None = None,
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self.model = model
        self.status = status or (lambda: describe(model, ""))
        self.icons = {look: state_icon(look) for look in Look}
        self.icon = QSystemTrayIcon(self.icons[Look.DISCONNECTED], self)
        self.menu = QMenu()
        self.status_action = self.menu.addAction("")
        self.status_action.setEnabled(False)
        self.menu.addSeparator()
        self.start_action = self._add("&Start contributing", self.startRequested)
        self.pause_action = self._add("&Pause", self.pauseRequested)
        self.resume_action = self._add("&Resume", self.resumeRequested)
        self.stop_action = self._add("S&top contributing", self.stopRequested)
        self.snooze_menu = self.menu.addMenu("S&nooze")
        self.snooze_actions: list[QAction] = []
        for text, seconds in (("For &1 hour", 3600.0), ("For &3 hours", 3 * 3600.0)):
            action = self.snooze_menu.addAction(text)
            action.triggered.connect(lambda _=False, s=seconds: self.snoozeRequested.emit(s))
            self.snooze_actions.append(action)
        until = self.snooze_menu.addAction("Until &tomorrow (08:00)")
        until.triggered.connect(
            lambda: self.snoozeRequested.emit((tomorrow_morning() - datetime.now()).total_seconds())
        )
        self.snooze_actions.append(until)
        self.menu.addSeparator()
        self.dashboard_action = self._add("Open &dashboard", self.dashboardRequested)
        self.settings_action = self._add("Se&ttings…", self.settingsRequested)
        self.menu.addSeparator()
        self.quit_action = self._add("&Quit", self.quitRequested)
        self.icon.setContextMenu(self.menu)
        self.icon.activated.connect(self._on_activated)
        self._tooltip = ""
        self.tooltip_sets = 0  # how often the tray host was handed a new tooltip
        self._tooltip_timer = QTimer(self)
        self._tooltip_timer.setSingleShot(True)
        self._tooltip_timer.setInterval(TOOLTIP_BATCH_MS)
        self._tooltip_timer.timeout.connect(self._update_tooltip)
        model.stateChanged.connect(self.update)
        model.metricsChanged.connect(self._tooltip_later)
        model.tasksChanged.connect(self._tooltip_later)
        self.update()

    def _add(self, text: str, signal: SignalInstance) -> QAction:
        action = self.menu.addAction(text)
        action.triggered.connect(signal)
        return action

    def show(self) -> None:
        self.icon.show()

    def hide(self) -> None:
        self.icon.hide()

    def _on_activated(self, reason: QSystemTrayIcon.ActivationReason) -> None:
        if reason in (
            QSystemTrayIcon.ActivationReason.Trigger,
            QSystemTrayIcon.ActivationReason.DoubleClick,
        ):
            self.toggleDashboard.emit()

    def update(self) -> None:
        state = self.model.state
        status = self.status()
        self.look = status.look
        self.icon.setIcon(self.icons[status.look])
        self.status_action.setText(status.headline)
        running = state not in (EngineState.STOPPED, EngineState.ERROR)
        self.start_action.setVisible(not running)
        held = state in (EngineState.PAUSED, EngineState.WAITING)
        self.pause_action.setVisible(running and state is not EngineState.PAUSED)
        self.resume_action.setVisible(held)
        self.stop_action.setVisible(state is not EngineState.STOPPED)
        self.snooze_menu.setEnabled(running and state is not EngineState.PAUSED)
        self._update_tooltip()

    def tooltip_text(self) -> str:
        model = self.model
        status = self.status()
        lines = [f"HiveMind Worker: {status.headline}", status.detail]
        if model.host is not None:
            lines.append(
                f"CPU {model.host.cpu_percent:.0f}% · memory "
                f"{human_bytes(model.host.memory_used_bytes)} of "
                f"{human_bytes(model.host.memory_total_bytes)}"
            )
        lines.append(f"Task: {model.current_task_text()}")
        return "\n".join(line for line in lines if line)

    def _tooltip_later(self) -> None:
        if not self._tooltip_timer.isActive():
            self._tooltip_timer.start()

    def _update_tooltip(self) -> None:
        self._tooltip_timer.stop()
        text = self.tooltip_text()
        if text != self._tooltip:
            self._tooltip = text
            self.tooltip_sets += 1
            self.icon.setToolTip(text)

    def notify(self, title: str, message: str) -> None:
        if self.icon.isVisible() and QSystemTrayIcon.supportsMessages():
            self.icon.showMessage(title, message, self.icons[Look.ATTENTION], 15_000)
