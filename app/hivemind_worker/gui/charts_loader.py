"""Loads the charts' module in two steps: NumPy off the GUI thread, pyqtgraph on it."""

from __future__ import annotations

import importlib
import logging
import threading

from PySide6.QtCore import QObject, Signal

log = logging.getLogger(__name__)

# What the charts need that touches no Qt binding, so any thread may import it: NumPy and
# the standard modules pyqtgraph imports, about half of the charts' load time. pyqtgraph
# itself is not: importing it defines Qt classes and reads every attribute of QtCore, QtGui
# and QtWidgets, which makes PySide build its type objects; doing that beside the GUI thread
# crashed the app (a segfault in PySide's MetaObjectBuilder while the window took focus).
QT_FREE_MODULES = (
    "numpy",
    "numpy.typing",
    "cProfile",
    "decimal",
    "multiprocessing.connection",
    "pydoc",
    "xml.etree.ElementTree",
)
CHARTS_MODULE = "hivemind_worker.gui.charts"


class ChartsLoader(QObject):
    """Loads the chart module (NumPy, pyqtgraph) once per process, then says `loaded`.

    NumPy is imported on a worker thread; pyqtgraph and the charts on the GUI thread, in
    one event-loop turn once NumPy is in (PySide is not safe to import from two threads).
    It lives as long as the process, so the thread never signals a window that is gone.
    """

    loaded = Signal()
    _prepared = Signal()  # emitted on the worker thread, delivered on the GUI thread
    _instance: ChartsLoader | None = None

    def __init__(self) -> None:
        super().__init__()
        self.done = False
        self._started = False
        self._prepared.connect(self._finish)

    @classmethod
    def instance(cls) -> ChartsLoader:
        if cls._instance is None:
            cls._instance = ChartsLoader()  # made on the GUI thread: its signals queue there
        return cls._instance

    def start(self) -> None:
        if self._started:
            return
        self._started = True

        def prepare() -> None:
            for name in QT_FREE_MODULES:
                try:
                    importlib.import_module(name)
                except Exception:  # imported again on the GUI thread: the error shows there
                    log.exception("could not load %s for the charts", name)
            self._prepared.emit()

        threading.Thread(target=prepare, name="charts", daemon=True).start()

    def _finish(self) -> None:
        try:
            importlib.import_module(CHARTS_MODULE)
        except Exception:  # built on the GUI thread anyway: the error shows there
            log.exception("could not load the charts")
        self.done = True
        self.loaded.emit()
