"""The dashboard's time charts (pyqtgraph), coloured from the window palette."""

from __future__ import annotations

import html

import pyqtgraph as pg
from PySide6.QtGui import QPalette

from hivemind_worker.gui.model import HISTORY_SECONDS

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
        self.lines: dict[str, pg.PlotDataItem] = {}
        self.names: dict[str, tuple[str, str]] = {}  # key -> (name, colour), for the legend
        self.setMinimumHeight(120)

    def set_span(self, seconds: float) -> None:
        span = min(HISTORY_SECONDS, max(MIN_SPAN, seconds))
        self.getPlotItem().setXRange(-span, 0, padding=0)

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
