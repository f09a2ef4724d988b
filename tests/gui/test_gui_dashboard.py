"""The dashboard and the app against a real engine running real tasks on a real pool."""

from __future__ import annotations

import itertools
import socket
import sys
import threading
import time
from pathlib import Path

import pytest
from PySide6.QtWidgets import QMessageBox

from helpers.guikit import LoopPool, World, busy_task, make_world
from helpers.harness import USER, login_token
from hivemind_worker.config import read_state
from hivemind_worker.engine.engine import WorkerEngine
from hivemind_worker.engine.events import EngineState
from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.gui.app import WorkerApp
from hivemind_worker.gui.engine_thread import Bridge, CrashReporter, EngineThread
from hivemind_worker.gui.single_instance import SingleInstance
from hivemind_worker.pool.store import PoolStore
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import Resources, TaskStatus

NETWORK_TIMEOUT = 10.0  # pool_client.DEFAULT_TIMEOUT: how long one call may block the engine


def test_dashboard_fills_from_a_real_engine(qtbot, gui_app: tuple[WorkerApp, LoopPool]) -> None:
    app, pool = gui_app
    dash = app.dashboard
    app.engine_thread.submit(
        pool.submit([busy_task(3, cpu=True), busy_task(3, cpu=True), busy_task(1, cpu=True)])
    ).result(30)
    qtbot.mouseClick(dash.main_button, _left())  # "Start contributing"
    qtbot.waitUntil(lambda: dash.tasks_table.rowCount() >= 2, timeout=30_000)
    assert dash.main_button.text() == "Pause"
    names = {dash.tasks_table.item(r, 0).text() for r in range(dash.tasks_table.rowCount())}
    assert names  # the task label from the spec
    # Host and per-task chart lines fill at about 1 Hz.
    qtbot.waitUntil(lambda: len(app.model.host_history) >= 3, timeout=10_000)
    qtbot.waitUntil(
        lambda: dash.cpu_chart is not None and len(dash.cpu_chart.lines) >= 2, timeout=10_000
    )
    assert dash.cpu_chart is not None
    dash.redraws.flush()  # the batched redraw the window makes a moment later
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
    # The tasks burned 7 s of CPU time between them (by their own clocks); the totals count
    # it, less what the process sandbox's 1 Hz sampler missed at each task's end (< 1 s each).
    assert app.model.totals.cpu_seconds >= 3.5
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
    # Bug 3: a cancel asks first; "Keep running" keeps it running.
    qtbot.mouseClick(dash.cancel_button, _left())
    assert dash.cancel_box is not None and dash.cancel_box.isVisible()
    assert "another computer" in dash.cancel_box.informativeText()
    dash.cancel_box.button(QMessageBox.StandardButton.No).click()
    qtbot.wait(500)
    assert list(app.model.running) == [task_id] and not app.model.results
    qtbot.mouseClick(dash.cancel_button, _left())
    assert dash.cancel_box is not None
    dash.cancel_box.button(QMessageBox.StandardButton.Yes).click()
    qtbot.waitUntil(lambda: dash.results_table.rowCount() == 1, timeout=30_000)
    assert app.model.results[0].status is TaskStatus.CANCELLED
    assert app.model.totals.failed == 0  # a cancel is not counted as the task's failure
    qtbot.waitUntil(lambda: app.model.results[0].delivered is True, timeout=20_000)
    # Back in the pool's queue for other computers, and never handed to this one again,
    # although this worker is the only one and keeps asking for work.
    info = app.engine_thread.submit(pool.task_info(task_id)).result(10)
    assert info.attempt == 2 and info.status == pb.TASK_STATUS_QUEUED
    qtbot.wait(6_000)  # several polls
    info = app.engine_thread.submit(pool.task_info(task_id)).result(10)
    assert info.status == pb.TASK_STATUS_QUEUED
    assert not app.model.running and app.model.state is EngineState.IDLE
    assert not any("(attempt 2)" in entry.text for entry in app.model.log)
    store = PoolStore(pool.db)
    try:
        big = Resources(cpus=8, memory_bytes=1 << 34, disk_bytes=1 << 34)
        (other,) = store.lease_tasks("another-node", big, 1, ["process"], lease_seconds=60)
        assert other.task_id == task_id
    finally:
        store.close()


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


def test_the_window_is_up_while_the_sandbox_is_still_being_chosen(
    qtbot, tmp_path: Path, memory_keyring
) -> None:
    """Choosing Docker or the process sandbox (a Docker ping, a tidy-up) happens on the engine
    thread after the window shows; the window says so meanwhile, then what was chosen."""
    world = make_world(tmp_path / "home")
    release = threading.Event()

    def choose() -> ProcessExecutor:
        release.wait(30)  # as a slow or wedged Docker engine would
        return ProcessExecutor(world.settings.work_dir)

    engine = WorkerEngine(
        world.settings,
        node_id=world.settings.node_id,
        credentials=world.credentials,
        executor=choose,
        outbox_dir=world.paths.outbox_dir,
    )
    app = WorkerApp(
        world.settings, world.paths, world.credentials, engine,
        autostart_engine=False, show_tray=False, exit_on_quit=False,
    )  # fmt: skip
    try:
        app.start_engine(show_dashboard=True)
        qtbot.waitUntil(app.dashboard.isVisible, timeout=10_000)
        assert "looking for Docker" in app.dashboard.connection_label.text()
        app.open_settings()
        assert app.settings_dialog is not None
        assert "Looking for Docker" in app.settings_dialog.docker_status.text()
        release.set()
        qtbot.waitUntil(
            lambda: "process sandbox" in app.dashboard.connection_label.text(), timeout=20_000
        )
        assert "built-in process sandbox" in app.settings_dialog.docker_status.text()
    finally:
        release.set()
        engine.shutdown()
        app.engine_thread.wait(30_000)
        app.dispose()
        qtbot.wait(50)


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
    # Bug 11: header, tray menu and tooltip say until when, not only "Paused".
    until = time.strftime("%H:%M", time.localtime(app.snooze_until))
    assert app.dashboard.state_label.text() == f"Snoozed until {until}"
    assert f"resumes by itself at {until}" in app.dashboard.state_detail.text()
    assert app.tray.status_action.text() == f"Snoozed until {until}"
    assert f"Snoozed until {until}" in app.tray.tooltip_text()
    app.snooze_until = time.time() - 1  # an hour later (or after a suspend)
    app._check_snooze()
    qtbot.waitUntil(lambda: app.model.state is EngineState.BUSY, timeout=10_000)
    assert app.snooze_until is None


def test_signing_out_stops_taking_tasks_and_lets_running_ones_finish(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    """Bug 2: after Log out the header still said Contributing and new tasks were run."""
    app, pool = gui_app
    (first,) = app.engine_thread.submit(pool.submit([busy_task(3, 8)])).result(30)
    app.start()
    qtbot.waitUntil(lambda: list(app.model.running) == [first], timeout=30_000)
    app.open_settings()
    dialog = app.settings_dialog
    assert dialog is not None
    qtbot.waitUntil(lambda: dialog.logged_in_as == USER, timeout=10_000)
    qtbot.mouseClick(dialog.logout_button, _left())
    qtbot.waitUntil(lambda: app.model.state is EngineState.DRAINING, timeout=10_000)
    assert "signed out" in app.dashboard.connection_label.text()
    # The running task finishes and its result reaches the pool; then the worker stops.
    qtbot.waitUntil(lambda: app.model.state is EngineState.STOPPED, timeout=60_000)
    assert app.model.results[0].status is TaskStatus.SUCCEEDED
    assert app.model.results[0].delivered is True
    assert app.dashboard.state_label.text() == "Not contributing"
    # A task submitted after the sign-out is not fetched.
    (later,) = app.engine_thread.submit(pool.submit([busy_task(1, 8)])).result(30)
    qtbot.wait(5_000)
    info = app.engine_thread.submit(pool.task_info(later)).result(10)
    assert info.status == pb.TASK_STATUS_QUEUED
    assert not app.model.running
    from hivemind_worker.gui.app import was_contributing

    app.model.flush()
    assert not was_contributing(app.paths)  # and it does not start by itself next time


def test_the_app_resumes_contributing_after_a_restart(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    """Bug 11: quit while contributing, start again: it did not carry on."""
    from hivemind_worker.gui.app import should_start

    app, _ = gui_app
    assert not should_start(app.settings, app.paths)
    app.start()
    qtbot.waitUntil(lambda: app.model.state is EngineState.IDLE, timeout=20_000)
    app.model.flush()
    assert read_state(app.paths)["contributing"] is True
    assert should_start(app.settings, app.paths)  # what run_gui passes as autostart
    app.stop()
    app.model.flush()
    assert not should_start(app.settings, app.paths)


def test_a_lost_pool_reads_as_one_sentence_with_the_result_waiting(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    """Bug 10: three lines of raw gRPC text, the stopped look, and a result shown nowhere."""
    from helpers.harness import start_pool
    from hivemind_worker.gui.icons import Look

    app, pool = gui_app
    world = pool.world
    assert world.pool is not None
    address = world.pool.address
    (task_id,) = app.engine_thread.submit(pool.submit([busy_task(4, 8)])).result(30)
    app.start()
    qtbot.waitUntil(lambda: list(app.model.running) == [task_id], timeout=30_000)
    app.engine_thread.submit(world.pool.stop(grace=0)).result(30)
    world.pool = None
    dash = app.dashboard
    qtbot.waitUntil(lambda: dash.state_label.text() == "Disconnected", timeout=60_000)
    height = dash.state_detail.height()
    qtbot.waitUntil(lambda: len(app.model.results) == 1, timeout=30_000)
    qtbot.waitUntil(
        lambda: "will be sent when it is back" in dash.state_detail.text(), timeout=30_000
    )
    detail = dash.state_detail.text()
    assert f"Can't reach the pool at {address}." in detail
    for raw in ("UNKNOWN", "ipv4", "failed to connect", "StatusCode", "gRPC"):
        assert raw not in detail
    assert dash.state_detail.height() == height  # the layout does not jump
    assert dash.details_button.isVisible() and "UNAVAILABLE" in dash.details_text
    assert app.status().look is Look.DISCONNECTED
    assert dash.results_table.item(0, 5).text() == "waiting for the pool"
    # The pool comes back on the same address: the waiting result is delivered.
    world.pool = app.engine_thread.submit(start_pool(pool.db, listen=address)).result(30)
    qtbot.waitUntil(lambda: app.model.results[0].delivered is True, timeout=90_000)
    qtbot.waitUntil(lambda: dash.results_table.item(0, 5).text() == "yes", timeout=10_000)
    qtbot.waitUntil(lambda: dash.state_label.text() != "Disconnected", timeout=30_000)


def test_reconnects_forced_by_settings_leave_no_unretrieved_errors(
    qtbot, gui_app: tuple[WorkerApp, LoopPool], caplog
) -> None:
    """Bug 8: 'Task exception was never retrieved … PoolUnavailable' after two Applies."""
    import dataclasses
    import gc
    import logging

    app, pool = gui_app
    assert pool.world.pool is not None
    good = app.settings
    app.start()
    qtbot.waitUntil(lambda: app.model.state is EngineState.IDLE, timeout=20_000)
    caplog.set_level(logging.ERROR, logger="asyncio")
    for _ in range(2):
        app.apply_settings(dataclasses.replace(good, node_pool_address="127.0.0.1:9"))
        qtbot.wait(1500)
        app.apply_settings(good)
        qtbot.waitUntil(lambda: app.model.state is EngineState.IDLE, timeout=60_000)
    app.engine_thread.submit(_collect()).result(10)
    gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


async def _collect() -> None:
    import gc

    gc.collect()


def test_image_pull_progress_reaches_the_header_and_the_tooltip(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    # The Docker executor's image store calls on_pull from its pull thread; here the test
    # calls it in its place (no registry is reachable from this machine).
    app, _ = gui_app
    app.start()
    qtbot.waitUntil(lambda: app.model.state is EngineState.IDLE, timeout=20_000)
    assert app.engine.executor.on_pull is not None
    app.engine.executor.on_pull("python:3.12-slim", 45_000_000, 120_000_000)
    qtbot.waitUntil(lambda: "Downloading" in app.dashboard.state_detail.text(), timeout=5_000)
    assert "python:3.12-slim: 45 of 120 MB" in app.dashboard.state_detail.text()
    assert "python:3.12-slim: 45 of 120 MB" in app.tray.tooltip_text()
    app.engine.executor.on_pull("python:3.12-slim", 120_000_000, 120_000_000)
    qtbot.waitUntil(lambda: "Downloading" not in app.dashboard.state_detail.text(), timeout=5_000)


def test_charts_read_right(qtbot, gui_app: tuple[WorkerApp, LoopPool]) -> None:
    """Bug 12: one axis, two units; a 0.01 GiB memory band; legends on the lines."""
    import os

    app, pool = gui_app
    dash = app.dashboard
    app.engine_thread.submit(pool.submit([busy_task(20, 64)])).result(30)
    app.start()
    qtbot.waitUntil(
        lambda: dash.cpu_chart is not None and len(dash.cpu_chart.lines) == 2, timeout=30_000
    )
    assert dash.cpu_chart is not None and dash.mem_chart is not None
    qtbot.waitUntil(
        lambda: any(t.usage.cpu_percent > 5 for t in app.model.running.values()), timeout=20_000
    )
    task = next(iter(app.model.running.values()))
    dash.redraws.flush()  # the batched redraw the window makes a moment later
    _xs, ys = dash.cpu_chart.lines[task.task_id].getData()
    cores = os.cpu_count() or 1
    # Task CPU in % of this computer, like the host line: a one-core burner on n cores.
    assert max(ys) <= 100 / cores + 5
    assert abs(ys[-1] - task.history[-1][1] / cores) < 1e-6
    low, high = dash.mem_chart.getPlotItem().viewRange()[1]
    peak = max(m for _, _, m in app.model.host_history) / (1 << 30)
    assert low == 0 and high >= max(1.0, peak)  # from zero, at least 1 GiB, room for the peak
    assert high <= max(2.0, 2.5 * peak)  # and not so tall that the lines flatten out
    assert task.name in dash.cpu_legend.text() and "this computer" in dash.mem_legend.text()
    assert dash.cpu_chart.getPlotItem().legend is None  # nothing drawn over the lines


def test_not_signed_in_says_what_to_do_without_a_terminal_and_stop_works(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    """Bug 9: 'Run `hivemind-worker login` first', and Stop disabled in the error state."""
    from hivemind_worker.errors import ErrorKind
    from hivemind_worker.gui.icons import Look

    app, pool = gui_app
    assert pool.world.pool is not None
    address = pool.world.pool.address
    app.credentials.delete_token(address, USER)
    notified: list[tuple[str, str]] = []
    app.tray.notify = lambda title, message: notified.append((title, message))  # type: ignore[method-assign]
    app.start()
    dash = app.dashboard
    qtbot.waitUntil(lambda: app.model.state is EngineState.ERROR, timeout=20_000)
    assert app.model.state_kind is ErrorKind.LOGIN
    assert dash.state_label.text() == "Needs attention"
    assert (
        dash.state_detail.text()
        == f"Not signed in to the pool at {address}. Sign in from Settings."
    )
    qtbot.waitUntil(lambda: bool(notified), timeout=5_000)
    shown = " ".join([dash.state_detail.text(), app.tray.tooltip_text(), *notified[0]])
    for jargon in ("hivemind-worker", "terminal", "`", "Run "):
        assert jargon not in shown
    assert app.status().look is Look.ATTENTION
    assert dash.stop_button.isEnabled()  # the engine retries; Stop makes it give up
    qtbot.mouseClick(dash.stop_button, _left())
    qtbot.waitUntil(lambda: app.model.state is EngineState.STOPPED, timeout=20_000)


def test_a_window_closed_while_its_call_is_in_flight_does_not_crash_the_app(
    qtbot, tmp_path: Path, memory_keyring, caplog
) -> None:
    """A call's answer arriving after its window was destroyed crashed the whole app (a
    signal emitted from the engine thread on a deleted QObject: a segfault in CI). Now the
    answer is dropped, and a live window still hears its own."""
    import asyncio

    import shiboken6
    from PySide6.QtWidgets import QWidget

    from hivemind_worker.gui.engine_thread import Calls

    world: World = make_world(tmp_path / "home")
    bridge = Bridge()
    thread = EngineThread(world.engine, bridge, autostart=False)
    thread.start()
    release = threading.Event()
    try:

        async def slow() -> str:
            await asyncio.to_thread(release.wait, 10)
            return "late answer"

        window = QWidget()
        heard: list[object] = []
        call = Calls(thread, window).run(slow(), heard.append, heard.append)
        shiboken6.delete(window)  # the window closes; its Qt children go with it
        release.set()
        qtbot.waitUntil(call.future.done, timeout=10_000)
        qtbot.wait(300)  # the queued answer is delivered now (it crashed here before)
        assert heard == []  # nobody left to tell
        # Before: the answer was emitted on the deleted Call, which raised in the engine
        # thread (or, losing the race with the deletion, took the process down).
        failed = [r for r in caplog.records if r.name == "concurrent.futures"]
        assert failed == [], [r.getMessage() for r in failed]

        async def quick() -> int:
            return 42

        alive = QWidget()
        got: list[object] = []
        Calls(thread, alive).run(quick(), got.append, got.append)
        qtbot.waitUntil(lambda: got == [42], timeout=10_000)
    finally:
        release.set()
        world.engine.shutdown()
        assert thread.wait(30_000)
