"""A running task's progress ("epoch 3 of 10, loss 0.412") in the dashboard and the tray tooltip.

The task is a real one on a real engine and pool; its progress events are published to the
app's bridge from the engine's thread, as the engine's event hub does. The runners' own
progress lines becoming these events is checked by the integration tier.
"""

from __future__ import annotations

from helpers.guikit import LoopPool, busy_task
from hivemind_worker.engine.events import TaskProgress
from hivemind_worker.gui.app import WorkerApp

PROGRESS_COLUMN = 6


def publish_from_engine_thread(app: WorkerApp, event: TaskProgress) -> None:
    async def publish() -> None:
        app.bridge.publish(event)

    app.engine_thread.submit(publish()).result(10)


def test_running_task_shows_its_progress_in_the_table_and_the_tooltip(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    app, pool = gui_app
    dash = app.dashboard
    table = dash.tasks_table
    (task_id,) = app.engine_thread.submit(pool.submit([busy_task(10, 8)])).result(30)
    assert table.horizontalHeaderItem(PROGRESS_COLUMN).text() == "Progress"
    app.start()
    qtbot.waitUntil(lambda: table.rowCount() == 1, timeout=30_000)
    name = table.item(0, 0).text()
    assert table.item(0, PROGRESS_COLUMN).text() == ""  # nothing said yet: an empty cell
    assert app.tray.tooltip_text().endswith(f"Task: {name}")

    # First use: the environment is being built, and the person sees what is happening.
    building = "scikit-learn: installing 12 packages"
    publish_from_engine_thread(app, TaskProgress(task_id, 0, 0, "environment", text=building))
    qtbot.waitUntil(
        lambda: table.item(0, PROGRESS_COLUMN).text() == f"preparing: {building}", timeout=5_000
    )
    assert f"Task: {name} (preparing: {building})" in app.tray.tooltip_text()

    # Then training: the last event wins, with its validation metric.
    publish_from_engine_thread(app, TaskProgress(task_id, 1, 10, "epoch", "val_loss", 0.9))
    publish_from_engine_thread(app, TaskProgress(task_id, 3, 10, "epoch", "val_loss", 0.41234))
    qtbot.waitUntil(
        lambda: table.item(0, PROGRESS_COLUMN).text() == "epoch 3 of 10, val_loss 0.4123",
        timeout=5_000,
    )
    assert "Task: " + name + " (epoch 3 of 10, val_loss 0.4123)" in app.tray.tooltip_text()
    assert table.item(0, 2).text() == "running"  # the other columns are where they were

    # Finished: the row goes; a line that comes after its task does not bring it back.
    qtbot.waitUntil(lambda: dash.results_table.rowCount() == 1, timeout=60_000)
    publish_from_engine_thread(app, TaskProgress(task_id, 4, 10, "epoch", "val_loss", 0.3))
    qtbot.wait(200)
    assert table.rowCount() == 0 and not app.model.running
    assert app.tray.tooltip_text().endswith("Task: no task running")
