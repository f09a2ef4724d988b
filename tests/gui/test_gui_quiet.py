"""The desktop app is quiet when nobody looks: a hidden dashboard asks the engine for no live
metrics and redraws nothing, then catches up from the model's history when shown again; the
tray's tooltip is handed over only when its text changes."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from helpers.guikit import LoopPool
from hivemind_worker.engine.events import EngineState, MetricsSample
from hivemind_worker.engine.monitor import HostSample
from hivemind_worker.gui.app import WorkerApp
from hivemind_worker.gui.engine_thread import Bridge
from hivemind_worker.gui.model import WorkerModel
from hivemind_worker.gui.tray import Tray
from hivemind_worker.paths import default_paths


def host_points(app: WorkerApp) -> int:
    chart = app.dashboard.cpu_chart
    assert chart is not None
    xs, _ = chart.lines["host"].getData()
    return 0 if xs is None else len(xs)


def test_hidden_dashboard_stops_live_metrics_and_catches_up_when_shown(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    app, _pool = gui_app
    dash = app.dashboard
    qtbot.waitUntil(lambda: app.engine.watching_metrics, timeout=10_000)  # shown: live
    app.start()
    qtbot.waitUntil(lambda: app.model.state is EngineState.IDLE, timeout=30_000)
    qtbot.waitUntil(lambda: dash.cpu_chart is not None and host_points(app) >= 2, timeout=30_000)

    dash.hide()
    qtbot.waitUntil(lambda: not app.engine.watching_metrics, timeout=10_000)
    redraws, points = dash.redraws.redraws, host_points(app)
    history = len(app.model.host_history)
    # Hidden: the heartbeats' samples (every second with this pool) still reach the model's
    # history, and nothing on the window is redrawn.
    qtbot.waitUntil(lambda: len(app.model.host_history) >= history + 3, timeout=30_000)
    assert dash.redraws.redraws == redraws
    assert host_points(app) == points
    assert "charts" in dash.redraws.dirty

    # Shown again: the charts hold the whole history at once, and live metrics resume.
    dash.show_and_raise()
    assert host_points(app) == len(app.model.host_history)
    assert not dash.redraws.dirty
    qtbot.waitUntil(lambda: app.engine.watching_metrics, timeout=10_000)


def test_minimised_dashboard_is_not_watched(qtbot, gui_app: tuple[WorkerApp, LoopPool]) -> None:
    app, _pool = gui_app
    dash = app.dashboard
    qtbot.waitUntil(lambda: app.engine.watching_metrics, timeout=10_000)
    dash.showMinimized()
    qtbot.waitUntil(dash.isMinimized, timeout=10_000)
    qtbot.waitUntil(lambda: not app.engine.watching_metrics, timeout=10_000)
    assert not dash._tick.isActive()
    dash.show_and_raise()
    qtbot.waitUntil(lambda: app.engine.watching_metrics, timeout=10_000)
    assert dash._tick.isActive()


def test_tray_tooltip_is_handed_over_only_when_it_changes(qtbot, tmp_path: Path) -> None:
    bridge = Bridge()
    model = WorkerModel(bridge, default_paths(tmp_path))
    tray = Tray(model)
    sample = HostSample(12.0, 3 << 30, 16 << 30, 100 << 30, 200 << 30)
    bridge.metrics.emit(MetricsSample(sample, {}))
    qtbot.waitUntil(lambda: "CPU 12%" in tray.icon.toolTip(), timeout=5_000)
    sets = tray.tooltip_sets
    for _ in range(20):  # the same numbers, sample after sample
        bridge.metrics.emit(MetricsSample(sample, {}))
    tray._update_tooltip()  # what the batch timer runs
    assert tray.tooltip_sets == sets
    # New numbers, many times within one batch: one hand-over, with the latest text.
    for cpu in range(20, 40):
        bridge.metrics.emit(MetricsSample(replace(sample, cpu_percent=float(cpu)), {}))
    qtbot.waitUntil(lambda: tray.tooltip_sets == sets + 1, timeout=5_000)
    assert "CPU 39%" in tray.icon.toolTip()
    model._writer.shutdown()
