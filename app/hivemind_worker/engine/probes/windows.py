"""Windows probes through ctypes: GetLastInputInfo for idle time, SHQueryUserNotificationState
for a full-screen app, game or presentation. Only imported on Windows; never tested here."""

from __future__ import annotations

import ctypes
import logging
from ctypes import wintypes
from typing import Any

log = logging.getLogger(__name__)

# SHQueryUserNotificationState answers (shellapi.h): the ones where a person is watching
# something full screen.
QUNS_BUSY = 2  # a full-screen app is running, or presentation settings are on
QUNS_RUNNING_D3D_FULL_SCREEN = 3
QUNS_PRESENTATION_MODE = 4
_FULLSCREEN_STATES = {QUNS_BUSY, QUNS_RUNNING_D3D_FULL_SCREEN, QUNS_PRESENTATION_MODE}


class _LastInputInfo(ctypes.Structure):
    _fields_ = [("cbSize", wintypes.UINT), ("dwTime", wintypes.DWORD)]


class WindowsDesktop:
    """Idle time and full screen for the interactive session on Windows."""

    def __init__(self) -> None:
        self._user32: Any = None
        self._kernel32: Any = None
        self._shell32: Any = None
        try:
            windll: Any = ctypes.windll  # type: ignore[attr-defined]
            self._user32 = windll.user32
            self._kernel32 = windll.kernel32
            self._shell32 = windll.shell32
            self._kernel32.GetTickCount64.restype = ctypes.c_ulonglong
        except (AttributeError, OSError) as exc:
            log.info("Windows probes unavailable: %s", exc)

    def available(self) -> bool:
        return self._user32 is not None

    def idle_seconds(self) -> float | None:
        if self._user32 is None:
            return None
        info = _LastInputInfo(ctypes.sizeof(_LastInputInfo), 0)
        if not self._user32.GetLastInputInfo(ctypes.byref(info)):
            return None
        # dwTime is the 32-bit tick count of the last input: compare in 32 bits (it wraps
        # every 49.7 days).
        now = int(self._kernel32.GetTickCount64()) & 0xFFFFFFFF
        return float((now - info.dwTime) & 0xFFFFFFFF) / 1000.0

    def fullscreen(self) -> bool | None:
        if self._shell32 is None:
            return None
        state = ctypes.c_int(0)
        if self._shell32.SHQueryUserNotificationState(ctypes.byref(state)) != 0:  # S_OK
            return None
        return state.value in _FULLSCREEN_STATES

    def close(self) -> None:
        pass
