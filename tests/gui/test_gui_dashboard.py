"""The dashboard and the app against a real engine running real tasks on a real pool."""

from __future__ import annotations

import itertools
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

from helpers.guikit import LoopPool, World, busy_task, make_world
from helpers.harness import USER, login_token
from hivemind_worker.config import read_state
from hivemind_worker.engine.events import EngineState
from hivemind_worker.gui.app import SingleInstance, WorkerApp
from hivemind_worker.gui.engine_thread import Bridge, CrashReporter, EngineThread
from hivemind_worker.tasks import TaskStatus

NETWORK_TIMEOUT = 10.0  # pool_client.DEFAULT_TIMEOUT: how long one call may block the engine


def test_dashboard_fills_from_a_real_engine(qtbot, gui_app: tuple[WorkerApp, LoopPool]) -> None:
    app, pool = gui_app
    dash = app.dashboard
    app.engine_thread.submit(pool.submit([busy_task(4), busy_task(4), busy_task(1)])).result(30)
    qtbot.mouseClick(dash.main_button, _left())  # "Start contributing"
    qtbot.waitUntil(lambda: dash.tasks_table.rowCount() >= 2, timeout=30_000)
    assert dash.main_button.text() == "Pause"
    names = {dash.tasks_table.item(r, 0).text() for r in range(dash.tasks_table.rowCount())}
    assert names  # the task label from the spec
    # Host and per-task chart lines fill at about 1 Hz.
    qtbot.waitUntil(lambda: len(app.model.host_history) >= 3, timeout=10_000)
    qtbot.waitUntil(lambda: len(dash.cpu_chart.lines) >= 2, timeout=10_000)
    xs, _ys = dash.cpu_chart.lines["host"].getData()
    assert len(xs) >= 3 and all(-300 <= x <= 0 for x in xs)
    qtbot.waitUntil(
        lambda: any(t.usage.memory_bytes > 20 << 20 for t in app.model.running.values()),
        timeout=10_000,
    )
    assert "MiB" in dash.tasks_table.item(0, 5).text()
    # Everything finishes, is delivered, counted and persisted.
    qtbot.waitUntil(lambda: dash.results_table.rowCount() == 3, timeout=60_000)
    qtbot.waitUntil(lambda: all(r.delivered for r in app.model.results), timeout=30_000)
    assert dash.stat_done.value.text() == "3"
    assert app.model.totals.cpu_seconds > 1  # CPU time, not wall time: two cores are shared
    qtbot.waitUntil(
        lambda: read_state(app.paths).get("totals", {}).get("done") == 3, timeout=10_000
    )
    log_text = dash.log_view.toPlainText()
    assert "Started" in log_text and "Finished" in log_text
    dash.log_filter.setCurrentText("State changes")
    assert "Finished" not in dash.log_view.toPlainText()
    assert "Contributing" in dash.log_view.toPlainText()
    dash.log_filter.setCurrentText("All events")
    dash.log_search.setText("succeeded")
    assert all("succeeded" in line for line in dash.log_view.toPlainText().splitlines())


def test_totals_survive_a_restart(qtbot, tmp_path: Path, memory_keyring) -> None:
    from hivemind_worker.config import update_state

    world = make_world(tmp_path / "home")
    update_state(
        world.paths, lambda s: s.update(totals={"done": 7, "failed": 2, "cpu_seconds": 7200})
    )
    app = WorkerApp(world.settings, world.paths, world.credentials, world.engine,
                    autostart_engine=False, show_tray=False, exit_on_quit=False)  # fmt: skip
    assert app.dashboard.stat_done.value.text() == "7"
    assert app.dashboard.stat_failed.value.text() == "2"
    assert app.dashboard.stat_cpu.value.text() == "2.00"
    app.model.flush()
    app.dispose()
    qtbot.wait(50)


def test_pause_resume_and_cancel_from_the_dashboard(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    app, pool = gui_app
    dash = app.dashboard
    (task_id,) = app.engine_thread.submit(pool.submit([busy_task(120, 8)])).result(30)
    qtbot.mouseClick(dash.main_button, _left())
    qtbot.waitUntil(lambda: dash.tasks_table.rowCount() == 1, timeout=30_000)
    qtbot.mouseClick(dash.main_button, _left())  # Pause
    qtbot.waitUntil(lambda: app.model.state is EngineState.PAUSED, timeout=10_000)
    assert app.engine.state is EngineState.PAUSED
    assert dash.main_button.text() == "Resume"
    qtbot.waitUntil(lambda: dash.tasks_table.item(0, 2).text() == "paused", timeout=5_000)
    qtbot.mouseClick(dash.main_button, _left())  # Resume
    qtbot.waitUntil(lambda: app.model.state is EngineState.BUSY, timeout=10_000)
    dash.tasks_table.selectRow(0)
    assert dash.cancel_button.isEnabled()
    qtbot.mouseClick(dash.cancel_button, _left())
    qtbot.waitUntil(lambda: dash.results_table.rowCount() == 1, timeout=30_000)
    assert app.model.results[0].status is TaskStatus.CANCELLED
    assert app.model.totals.failed == 0  # a cancel is not counted as the task's failure
    # The pool took the unrequested cancel as "give it back": the task is out on a new lease,
    # and this worker, the only one, takes it up again at once: the table shows that new run.
    qtbot.waitUntil(
        lambda: app.engine_thread.submit(pool.task_info(task_id)).result(10).attempt >= 2,
        timeout=20_000,
    )
    qtbot.waitUntil(
        lambda: any("(attempt 2)" in entry.text for entry in app.model.log), timeout=20_000
    )
    assert dash.tasks_table.rowCount() == 1
    assert list(app.model.running) == [task_id]


def test_quit_drains_running_tasks_with_visible_progress(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    app, pool = gui_app
    (_task_id,) = app.engine_thread.submit(pool.submit([busy_task(3, 8)])).result(30)
    app.start()
    qtbot.waitUntil(lambda: len(app.model.running) == 1, timeout=30_000)
    with qtbot.waitSignal(app.quitFinished, timeout=60_000):
        app.quit()
        assert app.progress is not None and app.progress.isVisible()
        assert "Finishing 1 running task" in app.progress.labelText()
    assert not app.engine_thread.isRunning()
    assert app.model.results[0].status is TaskStatus.SUCCEEDED
    assert app.model.results[0].delivered is True


def test_gui_thread_never_stalls_on_an_unreachable_pool_or_running_tasks(
    qtbot,
    tmp_path: Path,
    memory_keyring,
) -> None:
    # A loopback server that accepts and never answers: every call waits for its deadline.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        silent.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(silent.accept()[0])
            except TimeoutError:
                continue

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    silent_address = f"127.0.0.1:{silent.getsockname()[1]}"
    world = make_world(tmp_path / "home", silent_address)
    world.credentials.set_token(silent_address, USER, "token-for-a-pool-that-never-answers")
    pool = LoopPool(world, tmp_path / "pool.db", [])
    app = WorkerApp(world.settings, world.paths, world.credentials, world.engine,
                    autostart_engine=True, show_tray=False, exit_on_quit=False)  # fmt: skip
    pool.app = app

    from PySide6.QtCore import QTimer

    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.monotonic()))
    try:
        timer.start()
        app.start_engine()
        qtbot.waitUntil(lambda: app.model.state is EngineState.CONNECTING, timeout=10_000)
        qtbot.wait(4000)  # the engine sits in a blocked call to the silent pool
        assert app.engine.state is EngineState.CONNECTING
        assert held, "the engine never reached the silent pool"
        # Phase two: a real pool on the engine loop, real tasks, the same ticking timer.
        # Waited for with the event loop running: .result() here would stall the timer itself.
        started = app.engine_thread.submit(pool.before())
        qtbot.waitUntil(started.done, timeout=30_000)
        submitted = app.engine_thread.submit(pool.submit([busy_task(2, 16) for _ in range(3)]))
        qtbot.waitUntil(submitted.done, timeout=30_000)
        submitted.result()
        qtbot.waitUntil(lambda: len(app.model.results) == 3, timeout=90_000)
        timer.stop()
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert len(ticks) > 300
        longest = max(gaps)
        where = ticks[gaps.index(longest)] - ticks[0]
        print(f"{len(ticks)} ticks, longest gap {longest * 1000:.0f} ms at {where:.1f} s")
        assert longest < NETWORK_TIMEOUT / 10, f"the GUI thread stalled for {longest:.2f} s"
    finally:
        stop.set()
        if world.pool is not None:
            app.engine_thread.submit(pool.after()).result(30)
        world.engine.shutdown()
        app.engine_thread.wait(30_000)
        for conn in held:
            conn.close()
        silent.close()
        app.model.flush()
        app.dispose()
        qtbot.wait(50)


def test_login_token_round_trip_through_the_engine_loop(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    # Work submitted from the GUI thread runs on the engine loop and comes back as a value.
    app, pool = gui_app
    assert pool.world.pool is not None
    token = app.engine_thread.submit(login_token(pool.world.pool.address)).result(30)
    assert isinstance(token, str) and token


def test_second_launch_raises_the_first_window(qtbot, tmp_path: Path) -> None:
    name = f"hivemind-worker-test-{tmp_path.name}"
    first = SingleInstance(name)
    assert not first.forward_to_running(200)
    assert first.listen()
    second = SingleInstance(name)
    with qtbot.waitSignal(first.activated, timeout=5_000):
        assert second.forward_to_running()
    qtbot.wait(100)  # let the served socket see the disconnect and delete itself
    assert first.server is not None
    first.server.close()


@pytest.mark.qt_no_exception_capture
def test_uncaught_exceptions_in_any_thread_are_logged_and_shown(qtbot, caplog) -> None:
    from hivemind_worker import logs
    from hivemind_worker.gui.engine_thread import install_excepthooks

    saved = sys.excepthook, threading.excepthook
    reporter = CrashReporter()
    try:
        # What setup_logging installs; the GUI hooks chain onto them.
        sys.excepthook = logs._log_uncaught
        threading.excepthook = logs._log_uncaught_in_thread
        install_excepthooks(reporter)
        with qtbot.waitSignal(reporter.crashed, timeout=5_000) as caught:
            thread = threading.Thread(target=lambda: 1 / 0, name="boom")
            thread.start()
            thread.join()
        assert caught.args[0] == "Unexpected error in boom"
        assert "ZeroDivisionError" in caught.args[1]
        with qtbot.waitSignal(reporter.crashed, timeout=5_000) as caught:
            try:
                raise RuntimeError("from the GUI thread")
            except RuntimeError:
                sys.excepthook(*sys.exc_info())  # type: ignore[arg-type]
        assert "RuntimeError" in caught.args[0]
        logged = [r for r in caplog.records if r.levelname == "CRITICAL"]
        assert any("boom" in r.getMessage() for r in logged)
        assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in logged)
    finally:
        sys.excepthook, threading.excepthook = saved


def test_engine_thread_reports_a_failing_hook_instead_of_dying_silently(
    qtbot, tmp_path: Path, memory_keyring
) -> None:
    world: World = make_world(tmp_path / "home")

    async def broken() -> None:
        raise OSError("the demo pool could not start")

    bridge = Bridge()
    thread = EngineThread(world.engine, bridge, autostart=False, before=broken)
    with qtbot.waitSignal(bridge.crashed, timeout=10_000) as caught:
        thread.start()
    assert "the demo pool could not start" in caught.args[1]
    assert thread.wait(10_000)


def _left():
    from PySide6.QtCore import Qt

    return Qt.MouseButton.LeftButton


@pytest.fixture(autouse=True)
def _no_real_autostart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def test_snooze_pauses_then_resumes_by_the_wall_clock(qtbot, gui_app) -> None:
    app, pool = gui_app
    app.engine_thread.submit(pool.submit([busy_task(60, 8)])).result(30)
    app.start()
    qtbot.waitUntil(lambda: app.model.state is EngineState.BUSY, timeout=30_000)
    app.tray.snooze_actions[0].trigger()  # "For 1 hour"
    qtbot.waitUntil(lambda: app.model.state is EngineState.PAUSED, timeout=10_000)
    assert app.snooze_until is not None and 3590 < app.snooze_until - time.time() <= 3600
    assert "Snoozed until" in app.dashboard.log_view.toPlainText()
    app.snooze_until = time.time() - 1  # an hour later (or after a suspend)
    app._check_snooze()
    qtbot.waitUntil(lambda: app.model.state is EngineState.BUSY, timeout=10_000)
    assert app.snooze_until is None
