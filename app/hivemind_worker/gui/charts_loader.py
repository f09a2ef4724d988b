"""Loads the charts' module (pyqtgraph and NumPy, most of the start-up) off the GUI thread."""

from __future__ import annotations

import importlib
import logging
import threading

from PySide6.QtCore import QObject, Signal

log = logging.getLogger(__name__)


class ChartsLoader(QObject):
    """Imports the chart module (pyqtgraph, NumPy) once per process on a worker thread.

    It lives as long as the process, so the thread never signals a window that is gone.
    """

    loaded = Signal()
    _instance: ChartsLoader | None = None

    def __init__(self) -> None:
        super().__init__()
        self.done = False
        self._started = False

    @classmethod
    def instance(cls) -> ChartsLoader:
        if cls._instance is None:
            cls._instance = ChartsLoader()  # made on the GUI thread: its signal queues there
        return cls._instance

    def start(self) -> None:
        if self._started:
            return
        self._started = True

        def load() -> None:
            try:
                importlib.import_module("hivemind_worker.gui.charts")
            except Exception:  # built on the GUI thread anyway: the error shows there
                log.exception("could not load the charts")
            self.done = True
            self.loaded.emit()

        threading.Thread(target=load, name="charts", daemon=True).start()
