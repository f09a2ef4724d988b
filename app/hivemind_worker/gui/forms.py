"""What the settings dialog and the first-run flow share: message colours, field checks, and
the pool and keyring calls they run off the GUI thread."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable

import psutil
from PySide6.QtCore import QEvent, QObject, Qt
from PySide6.QtGui import QKeyEvent
from PySide6.QtWidgets import QWidget

from hivemind_worker.config import GIB, Settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.wiring import login_to_pool

ERROR_STYLE = "color: #d64541;"  # mid red: readable on light and dark backgrounds
WARN_STYLE = "color: #b7791f;"  # amber
OK_STYLE = "color: #3fa66b;"
# What a pool account name may be (the pool's own rule): 1-64 of letters, digits and . _ @ -.
ACCOUNT_RE = re.compile(r"[A-Za-z0-9._@-]{1,64}")


def account_problem(text: str) -> str:
    """'' if `text` is a usable account name (or empty), else what is wrong with it."""
    if not text or ACCOUNT_RE.fullmatch(text):
        return ""
    if len(text) > 64:
        return "expected at most 64 characters"
    return "expected letters, digits and . _ @ - only (no spaces or slashes)"


class EnterRuns(QObject):
    """Return or Enter in a field runs `action` instead of the dialog's default button.

    Without it, Enter in the password field pressed OK: the dialog closed without signing in.
    """

    def __init__(self, field: QWidget, action: Callable[[], None]) -> None:
        super().__init__(field)
        self.action = action
        field.installEventFilter(self)

    def eventFilter(self, watched: QObject, event: QEvent) -> bool:
        if (
            event.type() == QEvent.Type.KeyPress
            and isinstance(event, QKeyEvent)
            and event.key() in (Qt.Key.Key_Return, Qt.Key.Key_Enter)
        ):
            self.action()
            return True
        return False


def free_disk_gb(settings: Settings) -> float:
    path = settings.work_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    return psutil.disk_usage(str(path)).free / GIB


async def test_connection(address: str, insecure: bool) -> str:
    """Ping the pool; a one-line answer for the dialog, or PoolError."""
    from hivemind_worker.engine.pool_client import NodePoolClient

    client = NodePoolClient(address, insecure=insecure, timeout=10)
    try:
        version = await client.ping()
    finally:
        await client.close()
    return f"Reached the pool (version {version or 'unknown'})"


async def log_in(
    settings: Settings, credentials: CredentialStore, account: str, password: str
) -> str:
    await login_to_pool(settings, credentials, account, password)
    return account


async def log_out(credentials: CredentialStore, address: str, account: str) -> None:
    await asyncio.to_thread(credentials.delete_token, address, account)


async def login_status(credentials: CredentialStore, address: str, account: str) -> str:
    """The account with a token for `address`, or '' (keyring calls, so off the GUI thread)."""
    last: str | None = await asyncio.to_thread(credentials.last_account, address)
    name = account or last or ""
    if not name:
        return ""
    token = await asyncio.to_thread(credentials.get_token, address, name)
    return name if token else ""
