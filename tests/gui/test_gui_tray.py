"""The tray icon on a real X server with a real tray host, driving a real engine and pool."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.xserver import missing_tools, xvfb_with_tray

HERE = Path(__file__).resolve().parent


@pytest.fixture
def tray_env(tmp_path: Path):
    missing = missing_tools()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"CI must install {missing} (see .ci/run)")
        pytest.skip(f"needs {missing}")
    with xvfb_with_tray(tmp_path / "x") as env:
        yield env


def test_tray_icon_is_shown_and_its_menu_drives_the_engine(tray_env, tmp_path: Path) -> None:
    # A child process: this one's QApplication is offscreen and a process gets only one.
    env = {**tray_env, "QT_QPA_PLATFORM": "xcb", "PYTHONUNBUFFERED": "1"}
    shot = tmp_path / "tray.png"
    done = subprocess.run(
        [sys.executable, str(HERE / "tray_child.py"), str(tmp_path), str(shot)],
        env=env, capture_output=True, text=True, timeout=240, check=False,
    )  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    assert done.returncode == 0 and lines, done.stdout[-3000:] + done.stderr[-5000:]
    found = json.loads(lines[-1])
    assert found["platform"] == "xcb"
    assert found["tray_available"] is True
    assert found["visible"] is True
    _x, _y, w, h = found["geometry"]
    assert w > 0 and h > 0  # embedded in trayer's panel, not a floating window
    assert found["start_visible_when_stopped"] is True
    assert found["after_start"] == "busy"
    assert found["icon_changed"] is True
    assert "CPU" in found["tooltip"] and "Task:" in found["tooltip"]
    assert found["pause_visible_when_busy"] is True
    assert found["after_pause"] == "paused"
    assert found["resume_visible_when_paused"] is True
    assert found["after_resume"] == "busy"
    assert found["quit"] is True
    assert found["looks"] == ["stopped", "contributing", "paused"]
    assert found["snoozed_menu"].startswith("Snoozed until ")
    assert found["snoozed_tooltip"].startswith("HiveMind Worker: Snoozed until ")
    assert shot.stat().st_size > 0
