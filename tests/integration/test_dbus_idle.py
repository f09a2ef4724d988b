"""Idle time over D-Bus (Wayland desktops) on a real private bus, with stand-in desktop services.

GNOME Shell and KDE cannot run here, so a small service on a real dbus-daemon answers for
them with the exact interface, path and types they export; the probe's code is the real one.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import threading
from collections.abc import Iterator

import pytest
from jeepney import HeaderFields, MessageType, new_error, new_method_return
from jeepney.bus_messages import message_bus
from jeepney.io.blocking import open_dbus_connection

from hivemind_worker.engine.probes.dbus_idle import DBusIdle

pytestmark = pytest.mark.skipif(
    shutil.which("dbus-daemon") is None and os.environ.get("CI") != "true",
    reason="needs dbus-daemon (Debian: dbus)",
)


@contextlib.contextmanager
def session_bus() -> Iterator[str]:
    daemon = subprocess.Popen(
        ["dbus-daemon", "--session", "--nofork", "--print-address"],
        stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert daemon.stdout is not None
        yield daemon.stdout.readline().strip()
    finally:
        daemon.terminate()
        daemon.wait(10)


@contextlib.contextmanager
def idle_service(
    address: str, name: str, path: str, method: str, sig: str, idle_ms: int
) -> Iterator[None]:
    """Own `name` on the bus and answer `method` on `path` with `idle_ms`, as the desktop does."""
    connection = open_dbus_connection(address)
    connection.send_and_get_reply(message_bus.RequestName(name), timeout=5)
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                message = connection.receive(timeout=0.1)
            except TimeoutError:
                continue
            if message.header.message_type is not MessageType.method_call:
                continue
            fields = message.header.fields
            if fields.get(HeaderFields.path) == path and fields.get(HeaderFields.member) == method:
                connection.send(new_method_return(message, sig, (idle_ms,)))
            else:
                connection.send(new_error(message, "org.freedesktop.DBus.Error.UnknownMethod"))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(5)
        connection.close()


def test_idle_time_from_a_stand_in_for_gnome_mutter_idle_monitor() -> None:
    with session_bus() as address, idle_service(
        address, "org.gnome.Mutter.IdleMonitor", "/org/gnome/Mutter/IdleMonitor/Core",
        "GetIdletime", "t", 123_456,
    ):  # fmt: skip
        probe = DBusIdle(address, system=False)
        try:
            assert probe.idle_seconds() == pytest.approx(123.456)
        finally:
            probe.close()


def test_idle_time_from_a_stand_in_for_kde_screensaver() -> None:
    with session_bus() as address, idle_service(
        address, "org.freedesktop.ScreenSaver", "/org/freedesktop/ScreenSaver",
        "GetSessionIdleTime", "u", 42_000,
    ):  # fmt: skip
        probe = DBusIdle(address, system=False)
        try:
            assert probe.idle_seconds() == pytest.approx(42.0)
        finally:
            probe.close()


def test_a_bus_with_no_desktop_service_is_unknown() -> None:
    with session_bus() as address:
        probe = DBusIdle(address, system=False)
        try:
            assert probe.idle_seconds() is None
        finally:
            probe.close()


def test_no_bus_at_all_is_unknown() -> None:
    probe = DBusIdle("unix:path=/nonexistent/bus", system=False)
    assert probe.idle_seconds() is None
