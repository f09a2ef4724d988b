"""The when-to-contribute probes against real sources: an X server, a window manager, sysfs."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from helpers.desktop import (
    app_window,
    missing_tools,
    move_pointer,
    set_fullscreen,
    write_battery,
    xvfb,
)
from hivemind_worker.engine.probes import DesktopProbes
from hivemind_worker.engine.probes.load import LoadProbe
from hivemind_worker.engine.probes.power import PowerProbe
from hivemind_worker.engine.probes.x11 import X11Desktop

needs_x = pytest.mark.skipif(
    bool(missing_tools()) and os.environ.get("CI") != "true",
    reason=f"needs {', '.join(missing_tools())} (Debian: xvfb openbox xdotool)",
)


@needs_x
def test_idle_time_from_xscreensaver_resets_when_the_pointer_moves(tmp_path: Path) -> None:
    with xvfb(tmp_path / "x") as display:
        desktop = X11Desktop(display)
        try:
            move_pointer(display, 10, 10)
            time.sleep(1.5)
            idle = desktop.idle_seconds()
            assert idle is not None and idle >= 1.0
            move_pointer(display, 200, 300)
            after = desktop.idle_seconds()
            assert after is not None and after < idle - 1.0
        finally:
            desktop.close()


@needs_x
def test_fullscreen_window_under_a_real_window_manager(tmp_path: Path) -> None:
    with xvfb(tmp_path / "x", window_manager=True) as display:
        desktop = X11Desktop(display)
        try:
            with app_window(display, "a game") as window:
                set_fullscreen(display, window, False)
                deadline = time.monotonic() + 10
                while desktop.fullscreen() is not False and time.monotonic() < deadline:
                    time.sleep(0.05)
                assert desktop.fullscreen() is False  # focused, but an ordinary window
                set_fullscreen(display, window, True)
                while not desktop.fullscreen() and time.monotonic() < deadline + 10:
                    time.sleep(0.05)
                assert desktop.fullscreen() is True
                set_fullscreen(display, window, False)
                while desktop.fullscreen() and time.monotonic() < deadline + 20:
                    time.sleep(0.05)
                assert desktop.fullscreen() is False
        finally:
            desktop.close()


def test_without_a_window_manager_full_screen_is_unknown(tmp_path: Path) -> None:
    if missing_tools() and os.environ.get("CI") != "true":
        pytest.skip("needs Xvfb")
    with xvfb(tmp_path / "x") as display:
        desktop = X11Desktop(display)
        try:
            assert desktop.fullscreen() is None
        finally:
            desktop.close()


def test_no_display_is_unknown_not_an_error() -> None:
    desktop = X11Desktop(":99999")
    assert desktop.idle_seconds() is None
    assert desktop.fullscreen() is None


def test_battery_from_a_sysfs_tree_through_psutil(tmp_path: Path) -> None:
    root = tmp_path / "power_supply"
    probe = PowerProbe(root)
    write_battery(root, plugged=False, percent=37)
    reading = probe.read()
    assert reading.on_battery is True
    assert reading.percent == 37
    write_battery(root, plugged=True, percent=38)
    assert probe.read().on_battery is False


def test_no_battery_folder_is_unknown(tmp_path: Path) -> None:
    reading = PowerProbe(tmp_path / "absent").read()
    assert reading.on_battery is None and reading.percent is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert PowerProbe(empty).read().on_battery is None  # a desktop: no battery at all


def test_other_cpu_is_the_host_load_less_this_process_tree() -> None:
    # The burner is a grandchild of this process, as a sandboxed task's program is.
    burner = subprocess.Popen(
        [sys.executable, "-c", "import os, time\nif os.fork() == 0:\n    while True: pass\n"
         "time.sleep(60)"],
    )  # fmt: skip
    try:
        tree = psutil.Process(burner.pid)
        while len(tree.children()) < 1:
            time.sleep(0.01)
        (grandchild,) = tree.children()
        probe = LoadProbe()
        assert probe.other_cpu_percent() is None  # nothing to compare with yet
        psutil.cpu_percent(None)
        ours_before, started = sum(grandchild.cpu_times()[:2]), time.monotonic()
        time.sleep(1.0)
        host = psutil.cpu_percent(None)
        cores = psutil.cpu_count() or 1
        spent = sum(grandchild.cpu_times()[:2]) - ours_before
        ours = spent / (time.monotonic() - started) / cores * 100
        other = probe.other_cpu_percent()
    finally:
        for process in psutil.Process(burner.pid).children(recursive=True):
            process.kill()
        burner.kill()
        burner.wait(10)
    assert other is not None
    assert ours > 0  # the burner did run, and it is not counted as other programs'
    assert other == pytest.approx(host - ours, abs=15)


def test_available_memory_is_a_share_of_the_total() -> None:
    memory = LoadProbe().memory_available_percent()
    assert memory is not None
    assert memory == pytest.approx(
        psutil.virtual_memory().available / psutil.virtual_memory().total * 100, abs=5
    )


def test_observe_without_any_desktop_never_raises(tmp_path: Path) -> None:
    probes = DesktopProbes.for_this_desktop(display=":99999", power_supply_path=tmp_path)
    try:
        seen = probes.observe()
    finally:
        probes.close()
    assert seen.fullscreen is None
    assert seen.on_battery is None
    assert seen.memory_available_percent is not None
