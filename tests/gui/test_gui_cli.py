"""Starting the desktop app as a person does: no display, a second launch, a signal, geometry."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from helpers.guikit import make_world
from hivemind_worker.config import read_state
from hivemind_worker.gui.app import WorkerApp


def worker(home: Path, *args: str, env: dict[str, str] | None = None) -> list[str]:
    return [sys.executable, "-m", "hivemind_worker", "--data-dir", str(home), *args]


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DISPLAY", "WAYLAND_DISPLAY")}
    env.pop("QT_QPA_PLATFORM", None)
    for name in ("NODE_ID", "NODE_POOL_ADDRESS", "HIVEMIND_ACCOUNT"):
        env.pop(name, None)
    env.update(extra)
    return env


def test_without_a_display_it_says_so_and_points_to_headless(tmp_path: Path) -> None:
    for args in ([], ["gui"], ["run"]):
        done = subprocess.run(
            worker(tmp_path, *args), env=clean_env(), capture_output=True, text=True,
            timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        assert "no display" in lines[0] and "run --headless" in lines[0]


def test_a_second_launch_raises_the_first_and_a_signal_quits_it(tmp_path: Path) -> None:
    # Offscreen counts as a display; the engine stays stopped (start_on_launch is off).
    # faulthandler: a crash prints every thread's Python stack into the log the assert shows.
    env = clean_env(QT_QPA_PLATFORM="offscreen", PYTHONUNBUFFERED="1", PYTHONFAULTHANDLER="1")
    args = ("gui", "--no-docker", "--node-pool", "127.0.0.1:9")
    log = (tmp_path / "first.log").open("wb")
    first = subprocess.Popen(worker(tmp_path, *args), env=env, stdout=log, stderr=log)
    try:
        deadline = time.monotonic() + 60
        while "single instance:" not in (tmp_path / "first.log").read_text():
            assert first.poll() is None, (tmp_path / "first.log").read_text()
            assert time.monotonic() < deadline, "the first instance never started listening"
            time.sleep(0.1)
        try:
            second = subprocess.run(
                worker(tmp_path, *args), env=env, capture_output=True, text=True,
                timeout=20, check=False,
            )  # fmt: skip
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"{exc.stdout!r} {exc.stderr!r}") from None
        assert "already running" in second.stdout, second.stdout + second.stderr
        assert second.returncode == 0, second.stdout + second.stderr
        assert first.poll() is None, (tmp_path / "first.log").read_text()
        first.send_signal(signal.SIGTERM)  # quits as the menu does: drain, then exit
        assert first.wait(60) == 0, (tmp_path / "first.log").read_text()
    finally:
        if first.poll() is None:
            first.kill()
            first.wait(10)
        log.close()


def test_window_geometry_is_remembered(qtbot, tmp_path: Path, memory_keyring) -> None:
    world = make_world(tmp_path / "home")
    app = WorkerApp(world.settings, world.paths, world.credentials, world.engine,
                    autostart_engine=False, show_tray=False, exit_on_quit=False)  # fmt: skip
    app.dashboard.resize(820, 480)
    app.dashboard.show()
    qtbot.waitExposed(app.dashboard)
    assert app.dashboard.height() == 480
    app.dashboard.close()  # no tray here: closing quits, saving the geometry first
    app.model.flush()
    assert "geometry" in read_state(world.paths)["gui"]
    app.dispose()
    again = WorkerApp(world.settings, world.paths, world.credentials, world.engine,
                      autostart_engine=False, show_tray=False, exit_on_quit=False)  # fmt: skip
    # The height (the offscreen screen is 800 px wide, narrower than the dashboard's minimum).
    assert again.dashboard.height() == 480
    again.model.flush()
    again.dispose()
    qtbot.wait(50)


# Run in a fresh interpreter (the test process has pyqtgraph loaded already): a spy on the
# import system notes every Qt-binding module imported off the main thread while the
# dashboard's charts load, as they do when the window first shows.
CHARTS_SPY = """
import sys, threading
QT = ("PySide6", "shiboken6", "shibokensupport", "pyqtgraph", "hivemind_worker.gui.charts")
off_main = []
class Spy:
    def find_spec(self, name, path=None, target=None):
        if name.startswith(QT) and threading.current_thread() is not threading.main_thread():
            off_main.append((threading.current_thread().name, name))
        return None
sys.meta_path.insert(0, Spy())
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
app = QApplication([])
from hivemind_worker.gui.charts_loader import ChartsLoader
loader = ChartsLoader.instance()
loader.loaded.connect(app.quit)
QTimer.singleShot(0, loader.start)
QTimer.singleShot(120_000, lambda: app.exit(3))
code = app.exec()
ready = loader.done and "pyqtgraph" in sys.modules and "numpy" in sys.modules
print("loaded" if ready else "not loaded")
print("off the main thread:", off_main)
sys.exit(code)
"""


def test_the_charts_load_no_qt_binding_off_the_gui_thread() -> None:
    # PySide builds its type objects as they are first read; pyqtgraph's import reads them
    # all. Done on the loader's thread while the window took focus, it crashed the app.
    done = subprocess.run(
        [sys.executable, "-c", CHARTS_SPY], env=clean_env(QT_QPA_PLATFORM="offscreen"),
        capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    assert "loaded" in done.stdout.splitlines(), done.stdout + done.stderr
    assert "off the main thread: []" in done.stdout.splitlines(), done.stdout
