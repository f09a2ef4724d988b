"""X11 probes: seconds since the last input (XScreenSaver) and a full-screen focused window (EWMH).

python-xlib speaks the X protocol in pure Python, so nothing native is needed beyond the
X server itself. Each call is one or two round trips to the server (well under a millisecond
locally); the engine still calls them from a worker thread. Any X error gives "unknown".
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

RETRY_SECONDS = 30.0


class X11Desktop:
    """One connection to the X display, opened on first use and again after a failure."""

    def __init__(self, display: str | None = None) -> None:
        self.display_name = display if display is not None else os.environ.get("DISPLAY", "")
        self._display: Any = None
        self._failed_at: float | None = None
        self._has_saver = False
        self._atoms: dict[str, int] = {}

    def available(self) -> bool:
        return bool(self.display_name)

    def _connect(self) -> Any:
        if self._display is not None:
            return self._display
        if not self.display_name:
            return None
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_SECONDS:
            return None
        try:
            from Xlib import display as xdisplay

            connection = xdisplay.Display(self.display_name)
            self._has_saver = connection.has_extension("MIT-SCREEN-SAVER")
            for name in (
                "_NET_ACTIVE_WINDOW",
                "_NET_WM_STATE",
                "_NET_WM_STATE_FULLSCREEN",
                "_NET_WM_WINDOW_TYPE",
                "_NET_WM_WINDOW_TYPE_DESKTOP",
            ):
                self._atoms[name] = connection.intern_atom(name)
        except Exception as exc:  # python-xlib raises many types; any of them means "unknown"
            self._fail(f"cannot open X display {self.display_name!r}: {exc}")
            return None
        self._display = connection
        self._failed_at = None
        return connection

    def _fail(self, why: str) -> None:
        if self._failed_at is None:
            log.info("X11 probe: %s", why)
        self._failed_at = time.monotonic()
        self.close()

    def close(self) -> None:
        display, self._display = self._display, None
        if display is not None:
            try:
                display.close()
            except Exception:  # the connection may already be gone
                log.debug("closing the X display failed", exc_info=True)

    def idle_seconds(self) -> float | None:
        """Seconds since the last keyboard or pointer input on this display, or None."""
        display = self._connect()
        if display is None or not self._has_saver:
            return None
        try:
            info = display.screen().root.screensaver_query_info()
        except Exception as exc:
            self._fail(f"XScreenSaver query failed: {exc}")
            return None
        return float(info.idle) / 1000.0

    def fullscreen(self) -> bool | None:
        """Whether the focused window is full screen and covers a monitor, or None."""
        display = self._connect()
        if display is None:
            return None
        try:
            return self._fullscreen(display)
        except Exception as exc:
            self._fail(f"reading the active window failed: {exc}")
            return None

    def _fullscreen(self, display: Any) -> bool | None:
        from Xlib import X

        root = display.screen().root
        active = root.get_full_property(self._atoms["_NET_ACTIVE_WINDOW"], X.AnyPropertyType)
        if active is None:
            return None  # no EWMH window manager: nothing says what has the focus
        if not active.value or not active.value[0]:
            return False
        window = display.create_resource_object("window", int(active.value[0]))
        state = window.get_full_property(self._atoms["_NET_WM_STATE"], X.AnyPropertyType)
        if state is None or self._atoms["_NET_WM_STATE_FULLSCREEN"] not in state.value:
            return False
        kind = window.get_full_property(self._atoms["_NET_WM_WINDOW_TYPE"], X.AnyPropertyType)
        if kind is not None and self._atoms["_NET_WM_WINDOW_TYPE_DESKTOP"] in kind.value:
            return False
        geometry = window.get_geometry()
        origin = window.translate_coords(root, 0, 0)
        # translate_coords(root, 0, 0) gives root's origin in the window's coordinates.
        left, top = -origin.x, -origin.y
        rect = (left, top, left + geometry.width, top + geometry.height)
        return any(_covers(rect, monitor) for monitor in self._monitors(display))

    def _monitors(self, display: Any) -> list[tuple[int, int, int, int]]:
        screen = display.screen()
        whole = [(0, 0, int(screen.width_in_pixels), int(screen.height_in_pixels))]
        if not display.has_extension("RANDR"):
            return whole
        try:
            reply = display.xrandr_get_monitors(screen.root, is_active=True)
        except Exception:  # RandR older than 1.5: the screen is the one monitor we know
            return whole
        monitors = [(m.x, m.y, m.x + m.width_in_pixels, m.y + m.height_in_pixels)
                    for m in reply.monitors]  # fmt: skip
        return monitors or whole


def _covers(window: tuple[int, int, int, int], monitor: tuple[int, int, int, int]) -> bool:
    return (
        window[0] <= monitor[0]
        and window[1] <= monitor[1]
        and window[2] >= monitor[2]
        and window[3] >= monitor[3]
    )
