"""Run by test_gui_tray.py under Xvfb + trayer: drive the real tray icon, print JSON findings."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

# Run as a script: the shared helpers live in tests/helpers.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import importlib.util

import keyring
from PySide6.QtCore import QCoreApplication, QEventLoop, QRect
from PySide6.QtWidgets import QSystemTrayIcon

from helpers.guikit import LoopPool, busy_task, make_world
from hivemind_worker.engine.events import EngineState
from hivemind_worker.gui.app import WorkerApp
from hivemind_worker.gui.main import make_qapplication

HERE = Path(__file__).resolve().parent


def memory_keyring() -> keyring.backend.KeyringBackend:
    """The in-memory keyring of tests/conftest.py (not importable by name: conftests collide)."""
    spec = importlib.util.spec_from_file_location("shared_conftest", HERE.parent / "conftest.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.MemoryKeyring()  # type: ignore[no-any-return]


def pump_until(predicate, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")
        QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.02)


def main() -> None:
    home = Path(sys.argv[1])
    shot = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    keyring.set_keyring(memory_keyring())
    app = make_qapplication()
    found: dict[str, object] = {"platform": app.platformName()}
    pump_until(QSystemTrayIcon.isSystemTrayAvailable, 15, "a system tray")
    found["tray_available"] = True

    world = make_world(home / "home", drain_timeout=10)
    pool = LoopPool(world, home / "pool.db", [busy_task(30, 8), busy_task(30, 8)])
    worker = WorkerApp(world.settings, world.paths, world.credentials, world.engine,
                       autostart_engine=False, before=pool.before, after=pool.after)  # fmt: skip
    pool.app = worker
    worker.start_engine(show_dashboard=False)
    tray = worker.tray
    pump_until(lambda: world.pool is not None and world.pool.port > 0, 20, "the pool")
    pump_until(tray.icon.isVisible, 10, "the tray icon to show")
    pump_until(lambda: tray.icon.geometry().isValid(), 10, "the icon to be embedded")
    geometry: QRect = tray.icon.geometry()
    found["visible"] = tray.icon.isVisible()
    found["geometry"] = [geometry.x(), geometry.y(), geometry.width(), geometry.height()]
    found["start_visible_when_stopped"] = tray.start_action.isVisible()
    icon_stopped = tray.icon.icon().cacheKey()
    found["looks"] = [tray.look.value]

    tray.start_action.trigger()  # the menu's Start contributing
    pump_until(lambda: world.engine.state is EngineState.BUSY, 30, "the engine to take tasks")
    pump_until(lambda: worker.model.state is EngineState.BUSY, 5, "the tray to hear of it")
    found["after_start"] = world.engine.state.value
    found["icon_changed"] = tray.icon.icon().cacheKey() != icon_stopped
    found["looks"].append(tray.look.value)
    pump_until(lambda: worker.model.host is not None, 10, "a metrics sample")
    found["tooltip"] = tray.icon.toolTip()
    found["pause_visible_when_busy"] = tray.pause_action.isVisible()
    if shot is not None:
        from PySide6.QtGui import QGuiApplication

        QGuiApplication.primaryScreen().grabWindow(0).save(str(shot))

    tray.pause_action.trigger()  # the menu's Pause
    pump_until(lambda: world.engine.state is EngineState.PAUSED, 15, "the engine to pause")
    pump_until(lambda: worker.model.state is EngineState.PAUSED, 5, "the tray to hear of it")
    found["after_pause"] = world.engine.state.value
    found["resume_visible_when_paused"] = tray.resume_action.isVisible()
    found["looks"].append(tray.look.value)

    tray.resume_action.trigger()
    pump_until(lambda: world.engine.state is EngineState.BUSY, 15, "the engine to resume")
    found["after_resume"] = world.engine.state.value

    tray.snooze_actions[0].trigger()  # Snooze > For 1 hour
    pump_until(lambda: worker.model.state is EngineState.PAUSED, 15, "the snooze to pause")
    found["snoozed_menu"] = tray.status_action.text()
    found["snoozed_tooltip"] = tray.icon.toolTip()

    tray.stop_action.trigger()  # tasks go back to the pool; quit then has nothing to wait for
    pump_until(lambda: worker.model.state is EngineState.STOPPED, 30, "the engine to stop")
    quit_done: list[bool] = []
    worker.quitFinished.connect(lambda: quit_done.append(True))
    tray.quit_action.trigger()
    pump_until(lambda: bool(quit_done), 40, "quit to finish")
    found["quit"] = not worker.engine_thread.isRunning()
    print(json.dumps(found), flush=True)


if __name__ == "__main__":
    main()
