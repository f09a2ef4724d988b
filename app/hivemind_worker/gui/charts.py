"""The dashboard's time charts (pyqtgraph), coloured from the window palette."""

from __future__ import annotations

import html
import os
import time

import pyqtgraph as pg
from PySide6.QtGui import QPalette

from hivemind_worker.gui.model import HISTORY_SECONDS, WorkerModel

GIB = 1024**3
# Distinguishable on light and dark backgrounds (Okabe-Ito, colour-blind safe).
SERIES_COLORS = ("#E69F00", "#56B4E9", "#009E73", "#CC79A7", "#0072B2", "#D55E00")
MIN_SPAN = 60  # seconds shown at first; the axis widens to HISTORY_SECONDS as data builds up


class Chart(pg.PlotWidget):  # type: ignore[misc]
    """A time chart of the last minutes; colours follow the window palette (light or dark)."""

    def __init__(self, title: str, unit: str, y_max: float | None) -> None:
        super().__init__()
        palette = self.palette()
        self.setBackground(palette.color(QPalette.ColorRole.Base))
        text = palette.color(QPalette.ColorRole.Text)
        self.setTitle(title, color=text.name())
        item = self.getPlotItem()
        for axis in ("left", "bottom"):
            item.getAxis(axis).setPen(text)
            item.getAxis(axis).setTextPen(text)
        item.setLabel("bottom", "seconds ago")
        item.setLabel("left", unit)
        # The unit is chosen by us: pyqtgraph's own SI scaling would print "GiB (x0.001)".
        item.getAxis("left").enableAutoSIPrefix(False)
        item.showGrid(x=True, y=True, alpha=0.2)
        item.setXRange(-MIN_SPAN, 0, padding=0)
        if y_max is not None:
            item.setYRange(0, y_max, padding=0.02)
        else:  # grow with the data, from zero
            item.enableAutoRange(axis="y")
            item.setAutoVisible(y=True)
            item.setLimits(yMin=0)
        item.setMouseEnabled(x=False, y=False)
        item.hideButtons()
        item.setMenuEnabled(False)
        self.title_text = title
        self.span = float(MIN_SPAN)
        self.top: float | None = y_max
        self.lines: dict[str, pg.PlotDataItem] = {}
        self.names: dict[str, tuple[str, str]] = {}  # key -> (name, colour), for the legend
        self.setMinimumHeight(120)

    def set_span(self, seconds: float) -> None:
        span = min(HISTORY_SECONDS, max(MIN_SPAN, seconds))
        if span != self.span:  # unchanged, it would only cost a layout
            self.span = span
            self.getPlotItem().setXRange(-span, 0, padding=0)

    def set_top(self, top: float) -> None:
        if top != self.top:
            self.top = top
            self.getPlotItem().setYRange(0, top, padding=0)

    def line(self, key: str, name: str, color: str, width: float = 2.0) -> pg.PlotDataItem:
        if key not in self.lines:
            self.lines[key] = self.plot([], [], pen=pg.mkPen(color, width=width))
        self.names[key] = (name, color)
        return self.lines[key]

    def drop_except(self, keep: set[str]) -> None:
        for key in list(self.lines):
            if key not in keep:
                item = self.lines.pop(key)
                self.names.pop(key, None)
                self.removeItem(item)

    def legend_html(self) -> str:
        """The legend sits under the plot, never on the lines."""
        return " &nbsp; ".join(
            f'<span style="color:{color}">&#9632;</span> {html.escape(name)}'
            for name, color in self.names.values()
        )


def draw_history(
    cpu: Chart, mem: Chart, model: WorkerModel, colors: dict[str, str], text: str
) -> dict[str, str]:
    """Set both charts' lines from the model's history, whole: a window shown again after
    a while catches up in one redraw. Returns the colours of the tasks still running (a
    task keeps its colour while it runs)."""
    now = time.time()
    host = list(model.host_history)
    xs = [t - now for t, _, _ in host]
    span = -xs[0] if xs else 0
    cpu.set_span(span)
    mem.set_span(span)
    cpu.line("host", "this computer", text).setData(xs, [c for _, c, _ in host])
    # A task's CPU counts per core (100 % = one core); the host's counts the whole machine.
    cores = os.cpu_count() or 1
    mem.line("host", "this computer", text).setData(xs, [m / GIB for _, _, m in host])
    keep = {"host"}
    for task in model.running.values():
        keep.add(task.task_id)
        if task.task_id not in colors:
            used = set(colors.values())
            free = [c for c in SERIES_COLORS if c not in used] or list(SERIES_COLORS)
            colors[task.task_id] = free[0]
        color = colors[task.task_id]
        txs = [t - now for t, _, _ in task.history]
        cpu.line(task.task_id, task.name, color).setData(
            txs, [c / cores for _, c, _ in task.history]
        )
        mem.line(task.task_id, task.name, color).setData(txs, [m / GIB for _, _, m in task.history])
    cpu.drop_except(keep)
    mem.drop_except(keep)
    # From zero, in steps of 1, 2, 4, 8… GiB: a 0.01 GiB band would turn noise into cliffs,
    # and a top that only moves in doublings does not make the lines jump every second.
    peak = max((m for _, _, m in host), default=0) / GIB
    top = 1.0
    while top < peak * 1.15:
        top *= 2
    mem.set_top(top)
    return {k: v for k, v in colors.items() if k in keep}
