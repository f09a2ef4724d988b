"""The settings dialog's "Kinds of tasks": a switch per framework, saved, and what the pool offers.

A real engine with the runners, the real pool on its loop. No framework is installed: a runner
task that reaches the worker fails at its environment's build (uv is offline, see the
gui_app_with_runners fixture); what is tested is the switch, not the framework.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

from PySide6.QtCore import QPoint, Qt

from helpers.guikit import LoopPool
from helpers.harness import USER
from helpers.runners import ml_task
from hivemind_worker.config import load_settings, settings_table
from hivemind_worker.engine.runners import download_mb
from hivemind_worker.gui.app import WorkerApp
from hivemind_worker.gui.settings_dialog import SettingsDialog
from hivemind_worker.gui.tasks_page import KINDS, download_words
from hivemind_worker.protocol import nodepool_pb2 as pb

T = TypeVar("T")


def on_loop(app: WorkerApp, coro: Awaitable[T]) -> T:
    """Run `coro` on the engine thread's loop (where the pool lives) and wait for it."""
    result: T = app.engine_thread.submit(coro).result(30)
    return result


def open_dialog(app: WorkerApp) -> SettingsDialog:
    app.open_settings()
    assert app.settings_dialog is not None
    return app.settings_dialog


def pytorch_task() -> pb.TaskSpec:
    task = ml_task(
        framework="pytorch",
        model="mlp",
        train_path="points.csv",
        target="label",
        layers=[pb.Layer(type="dense", units=4, activation="relu")],
        epochs=1,
        inputs={"points.csv": b"a,b,label\n0,1,x\n1,0,y\n0,0,x\n1,1,y\n"},
    )
    # Small enough to fit any test machine's caps: only the kind may keep it from this worker.
    task.resources.CopyFrom(pb.Resources(cpus=0.5, memory_bytes=256 << 20, disk_bytes=64 << 20))
    return task


def test_the_page_offers_every_runner_kind_with_its_download_size(qtbot, gui_app) -> None:
    app, _ = gui_app
    dialog = open_dialog(app)
    page = dialog.tasks
    declared = {s.key: s for s in settings_table()}
    for key, _words, environment in KINDS:
        assert declared[key].gui  # the dialog edits it, the TOML file keeps it
        assert page.switches[key].isChecked() is bool(declared[key].default)
        size = download_words(download_mb(environment))
        assert size.endswith(("MB", "GB")) and size.lower() in page.sizes[key].text().lower()
    # The heavy frameworks are off until the person says yes.
    assert not page.switches["ml_tensorflow"].isChecked()
    assert not page.switches["ml_pytorch"].isChecked()
    assert download_words(355) == "about 360 MB" and download_words(1349) == "about 1.3 GB"
    assert download_words(92) == "about 90 MB" and download_words(3) == "about 10 MB"


def test_pytorch_switch_decides_what_the_pool_offers_without_a_restart(
    qtbot, gui_app_with_runners: tuple[WorkerApp, LoopPool]
) -> None:
    app, pool = gui_app_with_runners
    server = pool.world.pool
    assert server is not None
    node = app.engine.node_id
    thread_before = app.engine_thread

    async def capabilities() -> frozenset[str]:
        return server.store.get_node(node, USER).capabilities

    async def parked() -> int:
        return server.parked_polls

    # Off (the default): registered without ml:pytorch, and a PyTorch task is not offered to
    # this worker: its poll is parked (the pool matched it against the queue and found nothing
    # it may run) while the task stays queued.
    (task_id,) = on_loop(app, pool.submit([pytorch_task()]))
    app.start()
    qtbot.waitUntil(lambda: on_loop(app, parked()) >= 1, timeout=30_000)
    registered = on_loop(app, capabilities())
    assert "ml:scikit-learn" in registered and "ml:pytorch" not in registered
    assert on_loop(app, pool.task_info(task_id)).status == pb.TASK_STATUS_QUEUED

    # On, in the dialog, saved: the file holds it, the engine registers again with it and
    # the poll in flight gives way to one that takes the PyTorch task.
    dialog = open_dialog(app)
    dialog.tabs.setCurrentWidget(dialog.tasks)
    switch = dialog.tasks.switches["ml_pytorch"]
    assert not switch.isChecked()
    # On its box: the check box spans the row, but only its box and words take a click.
    qtbot.mouseClick(switch, Qt.MouseButton.LeftButton, pos=QPoint(8, switch.height() // 2))
    assert switch.isChecked()
    qtbot.mouseClick(
        dialog.buttons.button(dialog.buttons.StandardButton.Ok), Qt.MouseButton.LeftButton
    )
    saved = load_settings(app.paths, env={})
    assert saved.ml_pytorch is True and saved.ml_tensorflow is False
    assert "ml_pytorch = true" in app.paths.settings_file.read_text()
    qtbot.waitUntil(lambda: "ml:pytorch" in on_loop(app, capabilities()), timeout=15_000)
    qtbot.waitUntil(lambda: on_loop(app, pool.task_info(task_id)).node_id == node, timeout=30_000)
    assert app.engine_thread is thread_before and app.engine_thread.isRunning()

    # Off again: the pool's record of this node drops it at once.
    dialog = open_dialog(app)
    dialog.tasks.switches["ml_pytorch"].setChecked(False)
    assert dialog.apply()
    assert load_settings(app.paths, env={}).ml_pytorch is False
    qtbot.waitUntil(lambda: "ml:pytorch" not in on_loop(app, capabilities()), timeout=15_000)
