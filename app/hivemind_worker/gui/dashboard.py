"""The dashboard window: live charts, running tasks, recent results, totals and the event log."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from datetime import datetime
from typing import TYPE_CHECKING

from PySide6.QtCore import QByteArray, QEvent, Qt, QTimer, Signal
from PySide6.QtGui import (
    QAction,
    QCloseEvent,
    QColor,
    QFont,
    QHideEvent,
    QKeySequence,
    QPalette,
    QShowEvent,
)
from PySide6.QtWidgets import (
    QAbstractItemView,
    QComboBox,
    QFrame,
    QGridLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QLineEdit,
    QMainWindow,
    QMessageBox,
    QPlainTextEdit,
    QPushButton,
    QSizePolicy,
    QSplitter,
    QTableWidget,
    QTableWidgetItem,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from hivemind_worker.engine.events import EngineState
from hivemind_worker.gui.charts_loader import ChartsLoader
from hivemind_worker.gui.icons import Look, state_icon
from hivemind_worker.gui.model import LogEntry, Status, WorkerModel, describe
from hivemind_worker.gui.redraw import Redraws
from hivemind_worker.gui.words import human_bytes, human_duration
from hivemind_worker.tasks import TaskStatus

if TYPE_CHECKING:
    from hivemind_worker.gui.charts import Chart

log = logging.getLogger(__name__)

LOG_FILTERS = {
    "All events": None,
    "Errors": {"error"},
    "Tasks": {"task", "error"},
    "State changes": {"state", "error"},
    "Task output": {"output"},
}


class _Stat(QFrame):
    """A number with a caption, for the totals row."""

    def __init__(self, caption: str) -> None:
        super().__init__()
        self.setFrameShape(QFrame.Shape.StyledPanel)
        layout = QVBoxLayout(self)
        layout.setContentsMargins(12, 6, 12, 6)
        self.value = QLabel("0")
        font = self.value.font()
        font.setPointSizeF(font.pointSizeF() * 1.6)
        font.setBold(True)
        self.value.setFont(font)
        self.value.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        label = QLabel(caption)
        label.setForegroundRole(QPalette.ColorRole.PlaceholderText)
        layout.addWidget(self.value)
        layout.addWidget(label)


class Dashboard(QMainWindow):
    """The main window; closing it hides it (the app lives in the tray)."""

    startRequested = Signal()
    pauseRequested = Signal()
    resumeRequested = Signal()
    stopRequested = Signal()
    cancelRequested = Signal(str)  # task id
    settingsRequested = Signal()
    setupRequested = Signal()
    quitRequested = Signal()
    geometryChanged = Signal(QByteArray)
    watchingChanged = Signal(bool)  # shown (live numbers wanted) or hidden / minimised

    def __init__(
        self,
        model: WorkerModel,
        *,
        close_to_tray: Callable[[], bool],
        status: Callable[[], Status] | None = None,
    ) -> None:
        super().__init__()
        self.model = model
        self.status = status or (lambda: describe(model, ""))
        self.details_text = ""
        self.cancel_box: QMessageBox | None = None
        self._close_to_tray = close_to_tray
        self.allow_close = False  # set when the app really ends
        self.setWindowTitle("HiveMind Worker")
        self.setWindowIcon(state_icon(Look.CONTRIBUTING))
        self.resize(1040, 760)
        self._build()
        # Nothing is redrawn while the window is hidden or minimised (see redraw.py).
        self.redraws = Redraws(
            {"charts": self._update_charts, "tasks": self._update_tasks,
             "results": self._update_results, "totals": self._update_totals,
             "log": self._refill_log},
            at_once=frozenset({"results", "totals"}), parent=self,
        )  # fmt: skip
        model.stateChanged.connect(self._update_state)
        # A sample changes the tasks table's numbers only when tasks run.
        model.metricsChanged.connect(
            lambda: self.redraws.mark("charts", *(("tasks",) if model.running else ()))
        )
        model.tasksChanged.connect(lambda: self.redraws.mark("tasks"))
        model.resultsChanged.connect(lambda: self.redraws.mark("results"))
        model.totalsChanged.connect(lambda: self.redraws.mark("totals"))
        model.logAdded.connect(self._append_log)
        # Elapsed times tick even when no metrics arrive (engine stopped, paused); only
        # while the window shows.
        self._tick = QTimer(self)
        self._tick.setInterval(1000)
        self._tick.timeout.connect(self._on_tick)
        self._update_state()
        self._update_totals()
        self._update_results()
        self._update_tasks()

    # ------------------------------------------------------------------ layout

    def _build(self) -> None:
        central = QWidget()
        outer = QVBoxLayout(central)

        # The big control and the status line.
        top = QHBoxLayout()
        self.state_icon = QLabel()
        self.state_icon.setFixedSize(40, 40)
        self.state_label = QLabel()
        font = self.state_label.font()
        font.setPointSizeF(font.pointSizeF() * 1.5)
        font.setBold(True)
        self.state_label.setFont(font)
        self.state_detail = QLabel()
        self.state_detail.setWordWrap(True)
        # Room for two lines at all times: a longer or shorter message never moves the layout.
        self.state_detail.setFixedHeight(self.state_detail.fontMetrics().lineSpacing() * 2 + 4)
        self.state_detail.setAlignment(Qt.AlignmentFlag.AlignLeft | Qt.AlignmentFlag.AlignTop)
        self.details_button = QPushButton("&Details…")
        self.details_button.setToolTip("The technical text behind this message")
        self.details_button.clicked.connect(self.show_details)
        self.connection_label = QLabel()
        self.connection_label.setTextInteractionFlags(Qt.TextInteractionFlag.TextSelectableByMouse)
        status = QVBoxLayout()
        status.addWidget(self.state_label)
        detail_row = QHBoxLayout()
        detail_row.addWidget(self.state_detail, 1)
        detail_row.addWidget(self.details_button, 0, Qt.AlignmentFlag.AlignTop)
        status.addLayout(detail_row)
        status.addWidget(self.connection_label)
        self.main_button = QPushButton("Start contributing")
        self.main_button.setMinimumSize(220, 56)
        big = self.main_button.font()
        big.setPointSizeF(big.pointSizeF() * 1.3)
        big.setBold(True)
        self.main_button.setFont(big)
        self.main_button.setDefault(True)
        self.main_button.clicked.connect(self._on_main_button)
        self.main_button.setAccessibleName("Start, pause or resume contributing")
        self.stop_button = QPushButton("&Stop")
        self.stop_button.setToolTip("Stop contributing now; running tasks go back to the pool")
        self.stop_button.clicked.connect(self.stopRequested)
        settings_button = QPushButton("Se&ttings…")
        settings_button.clicked.connect(self.settingsRequested)
        top.addWidget(self.state_icon)
        top.addLayout(status, 1)
        top.addWidget(settings_button)
        top.addWidget(self.stop_button)
        top.addWidget(self.main_button)
        outer.addLayout(top)

        # Totals.
        totals = QHBoxLayout()
        self.stat_done = _Stat("tasks done")
        self.stat_failed = _Stat("tasks failed")
        self.stat_cpu = _Stat("CPU-hours contributed")
        self.stat_host = _Stat("this computer now")
        for stat in (self.stat_done, self.stat_failed, self.stat_cpu, self.stat_host):
            totals.addWidget(stat)
        outer.addLayout(totals)

        # Charts above, tables and log below, with a splitter the person can move.
        splitter = QSplitter(Qt.Orientation.Vertical)
        charts = QWidget()
        grid = QGridLayout(charts)
        grid.setContentsMargins(0, 0, 0, 0)
        self.chart_grid = grid
        # The charts need pyqtgraph and NumPy (most of the app's start-up time): they are built
        # once the window is first shown, NumPy imported off the GUI thread (_build_charts).
        self.cpu_chart: Chart | None = None
        self.mem_chart: Chart | None = None
        self._charts_requested = False
        self.charts_placeholder = QLabel("Charts are on their way…")
        self.charts_placeholder.setAlignment(Qt.AlignmentFlag.AlignCenter)
        self.charts_placeholder.setMinimumHeight(120)
        grid.addWidget(self.charts_placeholder, 0, 0, 1, 2)
        self.cpu_legend = QLabel()
        self.mem_legend = QLabel()
        for legend in (self.cpu_legend, self.mem_legend):
            legend.setWordWrap(True)
        self._colors: dict[str, str] = {}  # a task keeps its colour while it runs
        grid.addWidget(self.cpu_legend, 1, 0)
        grid.addWidget(self.mem_legend, 1, 1)
        splitter.addWidget(charts)

        self.tabs = QTabWidget()
        self.tasks_table = self._table(
            ["Task", "Image / kind", "State", "Elapsed", "CPU", "Memory", "Progress"]
        )
        self.tasks_table.itemSelectionChanged.connect(self._update_cancel_button)
        self.tasks_table.setAccessibleName("Running tasks")
        cancel_action = QAction("Cancel task", self.tasks_table)
        cancel_action.setShortcut(QKeySequence.StandardKey.Delete)
        cancel_action.triggered.connect(self._cancel_selected)
        self.tasks_table.addAction(cancel_action)
        self.tasks_table.setContextMenuPolicy(Qt.ContextMenuPolicy.ActionsContextMenu)
        self.cancel_button = QPushButton("&Cancel selected task")
        self.cancel_button.clicked.connect(self._cancel_selected)
        tasks_page = QWidget()
        tasks_layout = QVBoxLayout(tasks_page)
        tasks_layout.addWidget(self.tasks_table)
        row = QHBoxLayout()
        row.addStretch(1)
        row.addWidget(self.cancel_button)
        tasks_layout.addLayout(row)
        self.tabs.addTab(tasks_page, "&Running tasks")

        self.results_table = self._table(
            ["Task", "Status", "Duration", "Exit", "Result", "Delivered", "Finished", "Error"]
        )
        self.tabs.addTab(self.results_table, "Recent r&esults")

        log_page = QWidget()
        log_layout = QVBoxLayout(log_page)
        filters = QHBoxLayout()
        self.log_filter = QComboBox()
        self.log_filter.addItems(list(LOG_FILTERS))
        self.log_filter.currentIndexChanged.connect(self._refill_log)
        self.log_search = QLineEdit()
        self.log_search.setPlaceholderText("Filter text…")
        self.log_search.setClearButtonEnabled(True)
        self.log_search.textChanged.connect(self._refill_log)
        show = QLabel("&Show:")
        show.setBuddy(self.log_filter)
        filters.addWidget(show)
        filters.addWidget(self.log_filter)
        filters.addWidget(self.log_search, 1)
        self.log_view = QPlainTextEdit()
        self.log_view.setReadOnly(True)
        self.log_view.setMaximumBlockCount(5000)
        mono = QFont("monospace")
        mono.setStyleHint(QFont.StyleHint.Monospace)
        self.log_view.setFont(mono)
        log_layout.addLayout(filters)
        log_layout.addWidget(self.log_view)
        self.tabs.addTab(log_page, "Event &log")
        splitter.addWidget(self.tabs)
        splitter.setStretchFactor(0, 3)
        splitter.setStretchFactor(1, 2)
        splitter.setSizes([420, 300])
        outer.addWidget(splitter, 1)
        self.setCentralWidget(central)

        menu = self.menuBar().addMenu("&Worker")
        for text, signal, shortcut in (
            ("&Settings…", self.settingsRequested, QKeySequence.StandardKey.Preferences),
            ("&Quit", self.quitRequested, QKeySequence.StandardKey.Quit),
        ):
            action = QAction(text, self)
            action.setShortcut(shortcut)
            action.triggered.connect(signal)
            menu.addAction(action)
        setup = QAction("Set &up again…", self)
        setup.triggered.connect(self.setupRequested)
        menu.insertAction(menu.actions()[1], setup)
        close = QAction("&Close window", self)
        close.setShortcut(QKeySequence.StandardKey.Close)
        close.triggered.connect(self.close)
        menu.addAction(close)

    def _table(self, headers: list[str]) -> QTableWidget:
        table = QTableWidget(0, len(headers))
        table.setHorizontalHeaderLabels(headers)
        table.setSelectionBehavior(QAbstractItemView.SelectionBehavior.SelectRows)
        table.setSelectionMode(QAbstractItemView.SelectionMode.SingleSelection)
        table.setEditTriggers(QAbstractItemView.EditTrigger.NoEditTriggers)
        table.verticalHeader().setVisible(False)
        table.setAlternatingRowColors(True)
        header = table.horizontalHeader()
        header.setSectionResizeMode(QHeaderView.ResizeMode.ResizeToContents)
        header.setSectionResizeMode(0, QHeaderView.ResizeMode.Stretch)  # the task name
        header.setStretchLastSection(False)
        table.setSizePolicy(QSizePolicy.Policy.Expanding, QSizePolicy.Policy.Expanding)
        return table

    # ------------------------------------------------------------------ updates

    def _on_main_button(self) -> None:
        state = self.model.state
        if state in (EngineState.STOPPED, EngineState.ERROR):
            self.startRequested.emit()
        elif state in (EngineState.PAUSED, EngineState.WAITING):
            self.resumeRequested.emit()
        else:
            self.pauseRequested.emit()

    def _update_state(self) -> None:
        model = self.model
        state = model.state
        status = self.status()
        self.state_icon.setPixmap(state_icon(status.look).pixmap(40, 40))
        self.state_label.setText(status.headline)
        self.state_detail.setText(status.detail)
        self.state_detail.setToolTip(status.detail)
        self.details_text = status.details
        self.details_button.setVisible(bool(status.details))
        labels = {
            EngineState.STOPPED: "Start contributing",
            EngineState.ERROR: "Try again",
            EngineState.PAUSED: "Resume",
            EngineState.DRAINING: "Finishing…",
        }
        waiting = state is EngineState.WAITING  # held by the when-to-contribute rules
        self.main_button.setText("Resume" if waiting else labels.get(state, "Pause"))
        self.main_button.setEnabled(state is not EngineState.DRAINING)
        # In the error state the engine still retries: Stop is how to make it give up.
        self.stop_button.setEnabled(state is not EngineState.STOPPED)

    def show_details(self) -> None:
        box = QMessageBox(QMessageBox.Icon.Information, "Details", self.state_label.text(),
                          parent=self)  # fmt: skip
        box.setInformativeText(self.state_detail.text())
        box.setDetailedText(self.details_text)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)
        box.open()

    def set_connection(self, text: str) -> None:
        self.connection_label.setText(text)

    def _update_totals(self) -> None:
        totals = self.model.totals
        self.stat_done.value.setText(f"{totals.done:,}")
        self.stat_failed.value.setText(f"{totals.failed:,}")
        hours = totals.cpu_hours
        self.stat_cpu.value.setText(f"{hours:,.2f}" if hours >= 1 else f"{hours:.3f}")

    def _request_charts(self) -> None:
        """Build the charts once their module is loaded (NumPy off the GUI thread: ChartsLoader)."""
        if self._charts_requested:
            return
        self._charts_requested = True
        loader = ChartsLoader.instance()
        if loader.done:
            QTimer.singleShot(0, self, self._build_charts)  # not after this window is gone
        else:
            loader.loaded.connect(self._build_charts)  # disconnected if this window goes
            loader.start()

    def _build_charts(self) -> None:
        from hivemind_worker.gui.charts import Chart

        grid = self.chart_grid
        grid.removeWidget(self.charts_placeholder)
        self.charts_placeholder.deleteLater()
        self.cpu_chart = Chart("CPU (% of this computer)", "%", 100)
        self.mem_chart = Chart("Memory", "GiB", 1.0)
        # Charts are pictures to a screen reader; the same numbers are in the table and totals.
        self.cpu_chart.setAccessibleName("CPU use over the last minutes")
        self.mem_chart.setAccessibleName("Memory use over the last minutes")
        grid.addWidget(self.cpu_chart, 0, 0)
        grid.addWidget(self.mem_chart, 0, 1)
        self._update_charts()  # the history so far is in the model

    def _update_charts(self) -> None:
        if self.cpu_chart is None or self.mem_chart is None:  # not built yet: _build_charts
            return
        from hivemind_worker.gui.charts import draw_history  # loaded with the charts

        model = self.model
        if model.host is not None:
            self.stat_host.value.setText(
                f"{model.host.cpu_percent:.0f}% CPU · {human_bytes(model.host.memory_used_bytes)}"
            )
            title = f"Memory (of {human_bytes(model.host.memory_total_bytes)})"
            if self.mem_chart.title_text != title:  # a new title lays the whole plot out again
                self.mem_chart.title_text = title
                self.mem_chart.setTitle(
                    title, color=self.palette().color(QPalette.ColorRole.Text).name()
                )

        text = self.palette().color(QPalette.ColorRole.Text).name()
        self._colors = draw_history(self.cpu_chart, self.mem_chart, model, self._colors, text)
        self.cpu_legend.setText(self.cpu_chart.legend_html())
        self.mem_legend.setText(self.mem_chart.legend_html())

    def _on_tick(self) -> None:
        if self.model.running:  # elapsed times
            self.redraws.mark("tasks")

    def _update_tasks(self) -> None:
        model = self.model
        table = self.tasks_table
        selected = self.selected_task_id()
        tasks = list(model.running.values())
        table.setRowCount(len(tasks))
        now = time.time()
        paused = model.state in (EngineState.PAUSED, EngineState.WAITING)  # frozen
        for row, task in enumerate(tasks):
            values = [
                task.name,
                task.image or task.kind,
                "paused" if paused else "running",
                human_duration(now - task.started),
                f"{task.usage.cpu_percent / (os.cpu_count() or 1):.0f}%",
                human_bytes(task.usage.memory_bytes),
                task.progress_text,  # "epoch 3 of 10, loss 0.412" or "preparing: …"
            ]
            for col, value in enumerate(values):
                item = QTableWidgetItem(value)
                item.setData(Qt.ItemDataRole.UserRole, task.task_id)
                if 3 <= col <= 5:  # the numbers
                    item.setTextAlignment(
                        Qt.AlignmentFlag.AlignRight | Qt.AlignmentFlag.AlignVCenter
                    )
                table.setItem(row, col, item)
            if task.task_id == selected:
                table.selectRow(row)
        self._update_cancel_button()
        title = f"&Running tasks ({len(tasks)})"
        if self.tabs.tabText(0) != title:  # a changed tab text lays the tab bar out again
            self.tabs.setTabText(0, title)

    def selected_task_id(self) -> str | None:
        rows = self.tasks_table.selectionModel().selectedRows()
        if not rows:
            return None
        item = self.tasks_table.item(rows[0].row(), 0)
        return str(item.data(Qt.ItemDataRole.UserRole)) if item is not None else None

    def _update_cancel_button(self) -> None:
        self.cancel_button.setEnabled(self.selected_task_id() is not None)

    def _cancel_selected(self) -> None:
        """Ask first (not modal to the app: the GUI thread keeps running), then cancel."""
        task_id = self.selected_task_id()
        if task_id is None:
            return
        name = self.model.running[task_id].name if task_id in self.model.running else task_id
        box = QMessageBox(
            QMessageBox.Icon.Question,
            "Cancel task",
            f"Stop “{name}” on this computer?",
            QMessageBox.StandardButton.Yes | QMessageBox.StandardButton.No,
            self,
        )
        box.setInformativeText(
            "The task goes back to the pool and runs on another computer, never this one again."
        )
        box.button(QMessageBox.StandardButton.Yes).setText("Cancel &task")
        box.button(QMessageBox.StandardButton.No).setText("&Keep running")
        box.setDefaultButton(QMessageBox.StandardButton.No)
        box.setAttribute(Qt.WidgetAttribute.WA_DeleteOnClose)

        def answered(result: int) -> None:
            self.cancel_box = None
            if result == QMessageBox.StandardButton.Yes:
                self.cancelRequested.emit(task_id)

        box.finished.connect(answered)
        self.cancel_box = box
        box.open()

    def _update_results(self) -> None:
        rows = list(self.model.results)
        table = self.results_table
        table.setRowCount(len(rows))
        for r, result in enumerate(rows):
            connected = self.model.state not in (
                EngineState.CONNECTING, EngineState.ERROR, EngineState.STOPPED
            )  # fmt: skip
            waiting = "sending…" if connected else "waiting for the pool"
            delivered = {None: waiting, True: "yes", False: "refused"}[result.delivered]
            values = [
                result.name,
                result.status.value,
                human_duration(result.duration),
                str(result.exit_code),
                human_bytes(result.result_size) if result.result_size else "",
                delivered,
                f"{datetime.fromtimestamp(result.finished):%H:%M:%S}",
                result.error,
            ]
            for c, value in enumerate(values):
                item = QTableWidgetItem(value)
                if c == len(values) - 1 and value:
                    # The raw reason can be long (a registry's or the sandbox's words): one
                    # line in the table, the whole of it on hover.
                    first = value.strip().splitlines()[0]
                    item.setText(first if len(first) <= 80 else first[:79] + "…")
                    item.setToolTip(value)
                if c == 1 and result.status is not TaskStatus.SUCCEEDED:
                    item.setForeground(QColor("#d64541"))
                table.setItem(r, c, item)

    def _matches(self, entry: LogEntry) -> bool:
        wanted = LOG_FILTERS[self.log_filter.currentText()]
        if wanted is not None and entry.category not in wanted:
            return False
        needle = self.log_search.text().strip().lower()
        return not needle or needle in entry.text.lower()

    @staticmethod
    def _format(entry: LogEntry) -> str:
        return f"{datetime.fromtimestamp(entry.when):%H:%M:%S}  {entry.text}"

    def _append_log(self, entry: LogEntry) -> None:
        if not self.redraws.live:
            self.redraws.mark("log")  # refilled from the model's log when shown
        elif self._matches(entry):
            self.log_view.appendPlainText(self._format(entry))

    def _refill_log(self) -> None:
        lines = [self._format(e) for e in self.model.log if self._matches(e)]
        self.log_view.setPlainText("\n".join(lines))
        bar = self.log_view.verticalScrollBar()
        bar.setValue(bar.maximum())

    # ------------------------------------------------------------------ window

    def showEvent(self, event: QShowEvent) -> None:
        super().showEvent(event)
        self._request_charts()
        self._check_live()

    def hideEvent(self, event: QHideEvent) -> None:
        super().hideEvent(event)
        self._check_live()

    def changeEvent(self, event: QEvent) -> None:
        super().changeEvent(event)
        if event.type() == QEvent.Type.WindowStateChange:
            self._check_live()

    def _check_live(self) -> None:
        """Live numbers only while someone can see them: the engine samples once a second
        (watchingChanged) and the parts redraw only then; hidden, they catch up on show."""
        live = self.isVisible() and not self.isMinimized()
        if self.redraws.set_live(live):
            if live:
                self._tick.start()
            else:
                self._tick.stop()
            self.watchingChanged.emit(live)

    def show_and_raise(self) -> None:
        if self.isMinimized():
            self.showNormal()
        self.show()
        self.raise_()
        self.activateWindow()

    def closeEvent(self, event: QCloseEvent) -> None:
        if self.allow_close:
            event.accept()
            return
        self.geometryChanged.emit(self.saveGeometry())
        if self._close_to_tray():
            event.ignore()
            self.hide()
        else:
            event.ignore()
            self.quitRequested.emit()
