"""One instance per user and data folder: a later launch asks the running one to show itself."""

from __future__ import annotations

import getpass
import hashlib
import logging

from PySide6.QtCore import QObject, Signal
from PySide6.QtNetwork import QLocalServer, QLocalSocket

from hivemind_worker.paths import Paths

log = logging.getLogger(__name__)

SHOW_MESSAGE = b"show\n"


def instance_name(paths: Paths) -> str:
    """One name per user and data folder, so test runs with their own folders don't collide."""
    digest = hashlib.sha256(str(paths.data_dir).encode()).hexdigest()[:10]
    user = "".join(c for c in getpass.getuser() if c.isalnum()) or "user"
    return f"hivemind-worker-{user}-{digest}"


class SingleInstance(QObject):
    """The first instance listens on a local socket; later ones ask it to show its window."""

    activated = Signal()

    def __init__(self, name: str, parent: QObject | None = None) -> None:
        super().__init__(parent)
        self.name = name
        self.server: QLocalServer | None = None

    def forward_to_running(self, timeout_ms: int = 1000) -> bool:
        """True if another instance answered (and was asked to show itself)."""
        socket = QLocalSocket()
        socket.connectToServer(self.name)
        if not socket.waitForConnected(timeout_ms):
            return False
        socket.write(SHOW_MESSAGE)
        socket.waitForBytesWritten(timeout_ms)
        socket.disconnectFromServer()
        return True

    def listen(self) -> bool:
        server = QLocalServer(self)
        server.setSocketOptions(QLocalServer.SocketOption.UserAccessOption)
        if not server.listen(self.name):
            # A socket left by a crashed instance: nobody answered forward_to_running.
            QLocalServer.removeServer(self.name)
            if not server.listen(self.name):
                log.warning("single-instance socket unavailable: %s", server.errorString())
                return False
        server.newConnection.connect(self._on_connection)
        self.server = server
        log.info("single instance: a second launch will show this window (%s)", self.name)
        return True

    def _on_connection(self) -> None:
        assert self.server is not None
        while (socket := self.server.nextPendingConnection()) is not None:
            socket.readyRead.connect(lambda s=socket: self._on_ready(s))
            socket.disconnected.connect(socket.deleteLater)

    def _on_ready(self, socket: QLocalSocket) -> None:
        if bytes(socket.readAll().data()).startswith(SHOW_MESSAGE.strip()):
            self.activated.emit()
