"""Input idle time over D-Bus, for Wayland desktops where X11 cannot see the keyboard and mouse.

Asked in order, the first that answers wins: GNOME's Mutter IdleMonitor (milliseconds),
KDE's org.freedesktop.ScreenSaver GetSessionIdleTime (milliseconds), then systemd-logind's
session IdleHint (coarse: set by the desktop after its own idle timeout). jeepney speaks
D-Bus in pure Python; each call carries a short timeout, and the engine makes it from a
worker thread. No bus, no service, or an error gives "unknown".
"""

from __future__ import annotations

import logging
import os
import time
from typing import Any

log = logging.getLogger(__name__)

CALL_TIMEOUT = 0.5
RETRY_SECONDS = 30.0

_MUTTER = ("org.gnome.Mutter.IdleMonitor", "/org/gnome/Mutter/IdleMonitor/Core",
           "org.gnome.Mutter.IdleMonitor", "GetIdletime")  # fmt: skip
_SCREENSAVER = ("org.freedesktop.ScreenSaver", "/org/freedesktop/ScreenSaver",
                "org.freedesktop.ScreenSaver", "GetSessionIdleTime")  # fmt: skip


class DBusIdle:
    """Idle seconds from the session desktop or logind; None when none of them can tell."""

    def __init__(self, session_address: str | None = None, system: bool = True) -> None:
        self._session_address = session_address
        self._use_system = system
        self._session: Any = None
        self._system: Any = None
        self._source = ""  # which service answered last, for the log
        self._failed_at: float | None = None

    def available(self) -> bool:
        return bool(self._session_address or os.environ.get("DBUS_SESSION_BUS_ADDRESS")) or (
            self._use_system and os.path.exists("/run/systemd/seats")
        )

    def close(self) -> None:
        for name in ("_session", "_system"):
            connection = getattr(self, name)
            setattr(self, name, None)
            if connection is not None:
                try:
                    connection.close()
                except Exception:
                    log.debug("closing a D-Bus connection failed", exc_info=True)

    def idle_seconds(self) -> float | None:
        if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_SECONDS:
            return None
        for source, ask in (
            ("mutter", self._mutter),
            ("screensaver", self._screensaver),
            ("logind", self._logind),
        ):
            try:
                seconds = ask()
            except Exception as exc:  # jeepney and socket errors alike: try the next one
                log.debug("idle time from %s failed: %s", source, exc)
                continue
            if seconds is not None:
                if source != self._source:
                    log.info("input idle time comes from %s over D-Bus", source)
                    self._source = source
                self._failed_at = None
                return seconds
        if self._failed_at is None:
            log.info("no D-Bus service tells the input idle time here")
        self._failed_at = time.monotonic()
        self.close()
        return None

    def _session_bus(self) -> Any:
        if self._session is None:
            from jeepney.io.blocking import open_dbus_connection

            self._session = open_dbus_connection(self._session_address or "SESSION")
        return self._session

    def _call(self, connection: Any, target: tuple[str, str, str, str]) -> Any:
        from jeepney import DBusAddress, MessageType, new_method_call

        name, path, interface, method = target
        address = DBusAddress(path, bus_name=name, interface=interface)
        reply = connection.send_and_get_reply(
            new_method_call(address, method), timeout=CALL_TIMEOUT
        )
        if reply.header.message_type is MessageType.error:
            return None
        return reply.body

    def _mutter(self) -> float | None:
        body = self._call(self._session_bus(), _MUTTER)
        return None if body is None else float(body[0]) / 1000.0

    def _screensaver(self) -> float | None:
        body = self._call(self._session_bus(), _SCREENSAVER)
        return None if body is None else float(body[0]) / 1000.0

    def _logind(self) -> float | None:
        if not self._use_system:
            return None
        from jeepney import DBusAddress, MessageType, Properties
        from jeepney.io.blocking import open_dbus_connection

        if self._system is None:
            self._system = open_dbus_connection("SYSTEM")
        session = DBusAddress(
            "/org/freedesktop/login1/session/auto",
            bus_name="org.freedesktop.login1",
            interface="org.freedesktop.login1.Session",
        )
        props = Properties(session)
        hint = self._system.send_and_get_reply(props.get("IdleHint"), timeout=CALL_TIMEOUT)
        if hint.header.message_type is MessageType.error:
            return None
        if not hint.body[0][1]:
            return 0.0
        since = self._system.send_and_get_reply(props.get("IdleSinceHint"), timeout=CALL_TIMEOUT)
        if since.header.message_type is MessageType.error:
            return None
        return max(0.0, time.time() - float(since.body[0][1]) / 1e6)  # microseconds, wall clock
