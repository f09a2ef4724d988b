"""Tray and window icons drawn with QPainter at every size, so they stay crisp at any DPI."""

from __future__ import annotations

import math
import sys
from enum import StrEnum
from pathlib import Path

from PySide6.QtCore import QPointF, QRectF, Qt
from PySide6.QtGui import QBrush, QColor, QIcon, QImage, QPainter, QPainterPath, QPen, QPixmap

from hivemind_worker.engine.events import EngineState

SIZES = (16, 20, 22, 24, 32, 40, 48, 64, 128, 256)


class Look(StrEnum):
    """What the tray shows; several engine states share one look."""

    CONTRIBUTING = "contributing"
    READY = "ready"  # connected, waiting for the pool to send work
    WAITING = "waiting"  # your rules for when to contribute hold the tasks (on battery, …)
    PAUSED = "paused"  # paused or snoozed by hand
    DISCONNECTED = "disconnected"  # trying to reach the pool
    ATTENTION = "attention"  # the person must act (sign in, fix a setting)
    STOPPED = "stopped"  # not contributing, on purpose


def look_for(state: EngineState, *, attention: bool = False, disconnected: bool = False) -> Look:
    if attention or state is EngineState.ERROR:
        return Look.ATTENTION
    if disconnected:
        return Look.DISCONNECTED
    if state is EngineState.WAITING:  # the when-to-contribute rules hold the tasks
        return Look.WAITING
    return {
        EngineState.BUSY: Look.CONTRIBUTING,
        EngineState.DRAINING: Look.CONTRIBUTING,
        EngineState.IDLE: Look.READY,
        EngineState.PAUSED: Look.PAUSED,
        EngineState.CONNECTING: Look.DISCONNECTED,
        EngineState.STOPPED: Look.STOPPED,
    }[state]


# Mid-tone colours with a dark outline read on both light and dark panels; each look also
# has its own mark, so none depends on colour alone.
_FILL = {
    Look.CONTRIBUTING: QColor("#f2a900"),  # honey: working
    Look.READY: QColor("#3fa66b"),  # green: connected, waiting for work
    Look.WAITING: QColor("#8e6bbf"),  # violet: held by the person's rules
    Look.PAUSED: QColor("#4a8fd8"),
    Look.ATTENTION: QColor("#d64541"),
    Look.DISCONNECTED: QColor("#7d8793"),
    Look.STOPPED: QColor("#b9bec4"),
}
_OUTLINE = QColor("#2b2b2b")
_MARK = QColor("#ffffff")


def _hexagon(center: QPointF, radius: float) -> QPainterPath:
    path = QPainterPath()
    for i in range(6):
        angle = math.radians(60 * i - 30)
        point = QPointF(
            center.x() + radius * math.cos(angle), center.y() + radius * math.sin(angle)
        )
        if i == 0:
            path.moveTo(point)
        else:
            path.lineTo(point)
    path.closeSubpath()
    return path


def draw(look: Look, size: int) -> QImage:
    """One icon image: a hexagon in the state's colour with a mark for the state."""
    image = QImage(size, size, QImage.Format.Format_ARGB32_Premultiplied)
    image.fill(Qt.GlobalColor.transparent)
    p = QPainter(image)
    p.setRenderHint(QPainter.RenderHint.Antialiasing)
    c = QPointF(size / 2, size / 2)
    r = size * 0.47
    pen_width = max(1.0, size / 16)
    p.setPen(QPen(_OUTLINE, pen_width))
    p.setBrush(QBrush(_FILL[look]))
    p.drawPath(_hexagon(c, r - pen_width / 2))
    mark_pen = QPen(_MARK, max(1.5, size / 9), Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap)
    s = size / 32  # marks are designed on a 32 px grid
    if look is Look.CONTRIBUTING:
        # Three small cells: the hive at work.
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(_MARK)
        for dx, dy in ((-5, 4), (5, 4), (0, -4.5)):
            p.drawPath(_hexagon(QPointF(c.x() + dx * s, c.y() + dy * s), 4.6 * s))
    elif look is Look.READY:
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(_MARK)
        p.drawEllipse(c, 5 * s, 5 * s)
    elif look is Look.WAITING:  # a clock: it goes on by itself later
        p.setPen(QPen(_MARK, max(1.2, size / 14), Qt.PenStyle.SolidLine, Qt.PenCapStyle.RoundCap))
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.drawEllipse(c, 8 * s, 8 * s)
        p.drawLine(c, QPointF(c.x(), c.y() - 5.5 * s))
        p.drawLine(c, QPointF(c.x() + 4 * s, c.y()))
    elif look is Look.PAUSED:
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(_MARK)
        p.drawRoundedRect(QRectF(c.x() - 7 * s, c.y() - 8 * s, 5 * s, 16 * s), s, s)
        p.drawRoundedRect(QRectF(c.x() + 2 * s, c.y() - 8 * s, 5 * s, 16 * s), s, s)
    elif look is Look.ATTENTION:
        p.setPen(mark_pen)
        p.drawLine(QPointF(c.x(), c.y() - 8 * s), QPointF(c.x(), c.y() + 2 * s))
        p.drawPoint(QPointF(c.x(), c.y() + 8 * s))
    elif look is Look.STOPPED:  # a square: the media "stop"
        p.setPen(Qt.PenStyle.NoPen)
        p.setBrush(_OUTLINE)
        p.drawRoundedRect(QRectF(c.x() - 6 * s, c.y() - 6 * s, 12 * s, 12 * s), s, s)
    else:  # disconnected: a broken link, a ring with a slash through it
        p.setPen(mark_pen)
        p.setBrush(Qt.BrushStyle.NoBrush)
        p.drawArc(QRectF(c.x() - 7 * s, c.y() - 7 * s, 14 * s, 14 * s), 120 * 16, 300 * 16)
        p.drawLine(QPointF(c.x() - 9 * s, c.y() + 9 * s), QPointF(c.x() + 9 * s, c.y() - 9 * s))
    p.end()
    return image


def state_icon(look: Look) -> QIcon:
    icon = QIcon()
    for size in SIZES:
        icon.addPixmap(QPixmap.fromImage(draw(look, size)))
    return icon


def app_icon() -> QIcon:
    return state_icon(Look.CONTRIBUTING)


def write_icon_files(out_dir: Path) -> list[Path]:
    """PNG files of the app icon at each size (for file.ico and the .desktop entry)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for size in SIZES:
        path = out_dir / f"hivemind-worker-{size}.png"
        draw(Look.CONTRIBUTING, size).save(str(path))
        written.append(path)
    for look in Look:
        path = out_dir / f"tray-{look.value}.png"
        draw(look, 64).save(str(path))
        written.append(path)
    return written


if __name__ == "__main__":
    from PySide6.QtGui import QGuiApplication

    _app = QGuiApplication(sys.argv[:1])
    for written in write_icon_files(Path(sys.argv[1] if len(sys.argv) > 1 else "resources")):
        print(written)
