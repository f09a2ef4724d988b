"""The desktop app: tray icon, dashboard and settings dialog around a QThread-hosted engine.

This module stays Qt-free so the CLI can ask `has_display()` before importing Qt.
"""

from __future__ import annotations

import os
import sys


def has_display() -> bool:
    """Whether a window can open here: always on Windows and macOS; X11/Wayland on Linux."""
    if sys.platform in ("win32", "darwin"):
        return True
    if os.environ.get("QT_QPA_PLATFORM", "").split(":")[0] in ("offscreen", "minimal", "vnc"):
        return True
    return bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))
