"""A window's redraws: batched while it shows, held while nobody can see it.

The model changes once a second per metric sample and per task line; redrawing a chart or a
table on each of those is most of what an open dashboard costs, and all of it is wasted
while the window is hidden or minimised. Parts are marked dirty instead; a visible window
redraws the dirty parts together on one single-shot timer (REDRAW_BATCH_MS), a hidden one
redraws nothing and catches up from the model (which keeps the history) when shown again.
"""

from __future__ import annotations

from collections.abc import Callable

from PySide6.QtCore import QObject, QTimer

REDRAW_BATCH_MS = 200


class Redraws(QObject):
    """Dirty parts of one window and when to redraw them."""

    def __init__(
        self,
        parts: dict[str, Callable[[], None]],
        *,
        at_once: frozenset[str] = frozenset(),
        parent: QObject | None = None,
    ) -> None:
        super().__init__(parent)
        self._parts = parts  # in the order they are redrawn
        self._at_once = at_once  # rare changes a person waits to see: no batching delay
        self.dirty: set[str] = set()
        self.live = False
        self.redraws = 0  # parts redrawn so far (for tests and the benchmark)
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(REDRAW_BATCH_MS)
        self._timer.timeout.connect(self.flush)

    def mark(self, *parts: str) -> None:
        self.dirty.update(parts)
        if not self.live:
            return
        now = [p for p in parts if p in self._at_once]
        if now:
            self.flush(now)
        if self.dirty and not self._timer.isActive():
            self._timer.start()

    def set_live(self, live: bool) -> bool:
        """The window became visible (catch up now) or hidden; True if that changed."""
        if live == self.live:
            return False
        self.live = live
        if live:
            self.flush()
        else:
            self._timer.stop()
        return True

    def flush(self, only: list[str] | None = None) -> None:
        for name, redraw in self._parts.items():
            if name in self.dirty and (only is None or name in only):
                self.dirty.discard(name)
                self.redraws += 1
                redraw()
