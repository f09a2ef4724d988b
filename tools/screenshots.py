"""Render the first-run flow, the dashboard in each state (real tasks on a real local pool),
the settings dialog and the tray looks to PNG files."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import keyring
from keyring.backend import KeyringBackend
from PySide6.QtCore import QCoreApplication, QEventLoop, QRectF, Qt
from PySide6.QtGui import QColor, QFontMetrics, QImage, QPainter, QPalette
from PySide6.QtWidgets import QApplication, QStyleFactory, QWidget

from hivemind_worker.config import load_settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.engine.engine import WorkerEngine
from hivemind_worker.engine.events import EngineState
from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.gui.app import WorkerApp
from hivemind_worker.gui.main import make_qapplication
from hivemind_worker.paths import default_paths
from hivemind_worker.protocol import nodepool_pb2 as pb

USER, PASSWORD = "volunteer", "screenshots only"

_SOURCE = textwrap.dedent(
    """
    import sys, time
    hold = bytearray(int(sys.argv[2]) * 1024 * 1024)
    for i in range(0, len(hold), 4096):
        hold[i] = 1
    end, n = time.time() + float(sys.argv[1]), 0
    while time.time() < end:
        n += 1
        if n % 200000 == 0:
            time.sleep(float(sys.argv[3]))  # leave some CPU idle so the lines differ
    open("results/summary.txt", "w").write(f"{n} loops\\n")
    """
).lstrip()


def _task(label: str, seconds: float, megabytes: int, nap: float) -> pb.TaskSpec:
    return pb.TaskSpec(
        kind=pb.TASK_KIND_PYTHON,
        source=_SOURCE,
        argv=[str(seconds), str(megabytes), str(nap)],
        resources=pb.Resources(cpus=0.5, memory_bytes=512 << 20, disk_bytes=64 << 20),
        timeout_seconds=600,
        name=label,
    )


class _MemoryKeyring(KeyringBackend):
    priority = 1

    def __init__(self) -> None:
        super().__init__()  # type: ignore[no-untyped-call]
        self.values: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.values.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.values[service, username] = password

    def delete_password(self, service: str, username: str) -> None:
        self.values.pop((service, username), None)


def dark_palette() -> QPalette:
    p = QPalette()
    colors = {
        QPalette.ColorRole.Window: "#2b2d30",
        QPalette.ColorRole.WindowText: "#e8e8e8",
        QPalette.ColorRole.Base: "#1e1f22",
        QPalette.ColorRole.AlternateBase: "#26282b",
        QPalette.ColorRole.Text: "#e8e8e8",
        QPalette.ColorRole.Button: "#3a3d41",
        QPalette.ColorRole.ButtonText: "#e8e8e8",
        QPalette.ColorRole.Highlight: "#3d6fb4",
        QPalette.ColorRole.HighlightedText: "#ffffff",
        QPalette.ColorRole.ToolTipBase: "#3a3d41",
        QPalette.ColorRole.ToolTipText: "#e8e8e8",
        QPalette.ColorRole.PlaceholderText: "#9a9da2",
        QPalette.ColorRole.Link: "#7fb2ff",
    }
    for role, color in colors.items():
        p.setColor(role, QColor(color))
    for role in (
        QPalette.ColorRole.ButtonText,
        QPalette.ColorRole.WindowText,
        QPalette.ColorRole.Text,
    ):
        p.setColor(QPalette.ColorGroup.Disabled, role, QColor("#74777c"))
    p.setColor(QPalette.ColorGroup.Disabled, QPalette.ColorRole.Button, QColor("#323438"))
    return p


def pump(seconds: float) -> None:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        QCoreApplication.processEvents(QEventLoop.ProcessEventsFlag.AllEvents, 50)
        time.sleep(0.02)


def save(widget: QWidget, path: Path) -> None:
    pump(0.3)
    widget.grab().save(str(path))
    print(f"wrote {path}")


def pump_until(condition: Callable[[], bool], seconds: float, what: str) -> None:
    end = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > end:
            raise SystemExit(f"screenshots: gave up waiting for {what}")
        pump(0.1)


def tray_sheet(path: Path, dark: bool) -> None:
    """Every tray look at 16, 22 and 32 px on a panel, with its name: the looks side by side."""
    from hivemind_worker.gui.icons import Look, draw

    panel = QColor("#2b2d30" if dark else "#e9e9e9")
    text = QColor("#e8e8e8" if dark else "#202020")
    looks = list(Look)
    cell = 120
    image = QImage(cell * len(looks), 92, QImage.Format.Format_ARGB32)
    image.fill(panel)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setPen(text)
    for i, look in enumerate(looks):
        x = i * cell + 14
        for size, dx in ((16, 0), (22, 24), (32, 54)):
            painter.drawImage(x + dx, 40 - size // 2, draw(look, size))
        painter.drawText(QRectF(i * cell, 62, cell, 24), Qt.AlignmentFlag.AlignCenter,
                         look.value.replace("_", " "))  # fmt: skip
    painter.end()
    image.save(str(path))
    print(f"wrote {path}")


def schedule_excluding_now() -> tuple[str, str]:
    """Daily from two whole hours ahead, for six hours: now is outside it. Returns the
    schedule and the time it resumes at."""
    start = (datetime.now().hour + 2) % 24
    return f"daily {start:02d}:00-{(start + 6) % 24:02d}:00", f"{start:02d}:00"


def tray_state(worker: WorkerApp, path: Path, dark: bool) -> None:
    """The tray as the person sees it now: the icon on a panel, its tooltip and its menu."""
    from hivemind_worker.gui.icons import draw

    tray = worker.tray
    tray.update()
    menu = tray.menu.grab().toImage()
    tip = tray.tooltip_text().splitlines()
    panel = QColor("#2b2d30" if dark else "#e9e9e9")
    text = QColor("#e8e8e8" if dark else "#202020")
    tip_box = QColor("#3a3d41" if dark else "#ffffdc")
    font = QApplication.font()
    metrics = QFontMetrics(font)
    line = metrics.lineSpacing()
    tip_w = max(metrics.horizontalAdvance(t) for t in tip) + 20
    width = max(tip_w, menu.width()) + 120
    height = 48 + len(tip) * line + 20 + menu.height() + 24
    image = QImage(width, height, QImage.Format.Format_ARGB32)
    image.fill(panel)
    painter = QPainter(image)
    painter.setRenderHint(QPainter.RenderHint.Antialiasing)
    painter.setFont(font)
    painter.drawImage(12, 8, draw(tray.look, 32))
    painter.setPen(text)
    painter.drawText(QRectF(56, 8, width - 60, 32), Qt.AlignmentFlag.AlignVCenter,
                     f"tray icon: {tray.look.value}")  # fmt: skip
    top = 48
    painter.fillRect(QRectF(12, top, tip_w, len(tip) * line + 12), tip_box)
    for i, words in enumerate(tip):
        painter.drawText(QRectF(22, top + 6 + i * line, tip_w, line), Qt.AlignmentFlag.AlignLeft,
                         words)  # fmt: skip
    painter.drawImage(12, top + len(tip) * line + 24, menu)
    painter.end()
    image.save(str(path))
    print(f"wrote {path}")


def render(out: Path, *, dark: bool, wait: float) -> None:
    app = make_qapplication()
    app.setStyle(QStyleFactory.create("Fusion"))
    if dark:
        app.setPalette(dark_palette())
    keyring.set_keyring(_MemoryKeyring())
    home = Path(tempfile.mkdtemp(prefix="hivemind-shots-"))
    paths = default_paths(home)
    paths.ensure()
    settings = load_settings(
        paths,
        env={},
        overrides={"max_concurrent_tasks": "3", "drain_timeout": "3"},
    )
    credentials = CredentialStore(paths, allow_plaintext_fallback=False)
    engine = WorkerEngine(
        settings,
        node_id="node-screenshots",
        credentials=credentials,
        executor=ProcessExecutor(settings.work_dir),
        outbox_dir=paths.outbox_dir,
    )
    holder: dict[str, Any] = {}
    suffix = "-dark" if dark else ""
    out.mkdir(parents=True, exist_ok=True)
    tray_sheet(out / f"tray-looks{suffix}.png", dark)

    async def start_pool() -> None:
        from hivemind_worker.pool.server import PoolConfig, PoolServer
        from hivemind_worker.pool.store import PoolStore

        db = home / "pool.db"
        store = PoolStore(db)
        store.add_user(USER, PASSWORD)
        store.close()
        server = PoolServer(PoolConfig(db_path=db, listen="127.0.0.1:0", heartbeat_interval=1))
        await server.start()
        holder["server"] = server

    async def submit(specs: list[pb.TaskSpec]) -> None:
        from hivemind_worker.pool.client import TaskQueueClient

        queue = TaskQueueClient(holder["server"].address)
        await queue.login(USER, PASSWORD)
        for spec in specs:
            await queue.submit(spec)
        await queue.close()

    async def after() -> None:
        server = holder.get("server")
        if server is not None:
            await server.stop()

    worker = WorkerApp(settings, paths, credentials, engine, autostart_engine=False,
                       before=start_pool, after=after, show_tray=False)  # fmt: skip
    worker.open_setup()  # an empty data folder: the first-run flow comes first
    worker.start_engine(show_dashboard=False)
    pump_until(lambda: "server" in holder, 30, "the pool")
    address = holder["server"].address

    # The first-run flow, page by page, done for real against the local pool.
    wizard = worker.setup
    assert wizard is not None
    wizard.resize(680, 560)
    save(wizard, out / f"firstrun-1-welcome{suffix}.png")
    wizard.next()
    wizard.pool.address.setText(address)
    wizard.pool.account.setText(USER)
    wizard.pool.password.setText(PASSWORD)
    wizard.pool.test()
    pump_until(lambda: "Reached" in wizard.pool.test_result.text(), 20, "the connection test")
    wizard.pool.sign_in()
    pump_until(lambda: bool(wizard.pool.signed_in), 20, "the sign-in")
    save(wizard, out / f"firstrun-2-pool{suffix}.png")
    wizard.next()
    wizard.give.fields["max_cpu_cores"].setText(str(os.cpu_count() or 1))
    save(wizard, out / f"firstrun-3-give{suffix}.png")
    wizard.next()
    save(wizard, out / f"firstrun-4-when{suffix}.png")
    wizard.next()
    save(wizard, out / f"firstrun-5-docker{suffix}.png")
    wizard.next()
    save(wizard, out / f"firstrun-6-done{suffix}.png")
    worker.engine_thread.submit(submit([
        _task("warm-up 1", 1, 16, 0),
        _task("warm-up 2", 1, 16, 0),
        _task("protein fold #4812", wait + 12, 220, 0.0),
        _task("render tile 17/64", wait + 12, 120, 0.004),
        _task("monte carlo batch 9", wait + 12, 60, 0.012),
    ])).result(30)  # fmt: skip
    wizard.accept()  # Finish, "Start contributing now" ticked
    dash = worker.dashboard
    dash.resize(1180, 820)

    # Contributing, with live charts.
    pump_until(lambda: len(worker.model.running) >= 2, 60, "running tasks")
    pump(wait)
    save(dash, out / f"dashboard{suffix}.png")
    dash.tabs.setCurrentIndex(2)
    save(dash, out / f"dashboard-log{suffix}.png")
    dash.tabs.setCurrentIndex(0)

    # Snoozed, with the time it ends.
    worker.snooze(3600)
    pump_until(lambda: worker.model.state is EngineState.PAUSED, 20, "the snooze")
    save(dash, out / f"dashboard-snoozed{suffix}.png")
    worker.resume()

    # Waiting: the pool has nothing left to hand out.
    pump_until(lambda: worker.model.state is EngineState.IDLE, 120, "the tasks to finish")
    pump(1)
    dash.tabs.setCurrentIndex(1)
    save(dash, out / f"dashboard-waiting{suffix}.png")

    # The settings dialog, then a value no spin box would have kept, flagged beside the field.
    worker.open_settings()
    dialog = worker.settings_dialog
    assert dialog is not None
    pump(1.5)  # the login status arrives from the engine thread
    save(dialog, out / f"settings{suffix}.png")
    dialog.memory.setText("9999")
    dialog.cpu_spin.setText("0.5")
    save(dialog, out / f"settings-invalid{suffix}.png")
    dialog.memory.setText("2")
    assert dialog.apply()  # a CPU cap no task fits in: allowed, and said in the header
    dialog.reject()
    pump(1)
    save(dash, out / f"dashboard-no-task-fits{suffix}.png")
    dialog = None
    worker.open_settings()
    assert worker.settings_dialog is not None
    worker.settings_dialog.cpu_spin.setText("1")
    assert worker.settings_dialog.apply()
    worker.settings_dialog.reject()

    # When to contribute: a schedule that leaves out the present, typed on its settings page.
    worker.open_settings()
    dialog = worker.settings_dialog
    assert dialog is not None
    dialog.tabs.setCurrentWidget(dialog.policy)
    schedule, resumes = schedule_excluding_now()
    dialog.policy.fields["schedule"].setText(schedule)
    pump(1)
    save(dialog, out / f"settings-when{suffix}.png")
    worker.engine_thread.submit(submit([_task("genome chunk 311", 30, 48, 0.004)])).result(30)
    pump_until(lambda: len(worker.model.running) == 1, 60, "the task the schedule holds")
    pump(3)  # some chart first
    assert dialog.apply()  # the real engine's policy decides; nothing here is faked
    dialog.reject()
    pump_until(lambda: worker.model.state is EngineState.WAITING, 30, "the schedule's hold")
    pump_until(lambda: f"Resumes at {resumes}" in dash.state_detail.text(), 10, "until when")
    pump(2)
    save(dash, out / f"dashboard-schedule{suffix}.png")
    tray_state(worker, out / f"tray-schedule{suffix}.png", dark)
    worker.open_settings()
    assert worker.settings_dialog is not None
    worker.settings_dialog.policy.fields["schedule"].setText("")
    assert worker.settings_dialog.apply()
    worker.settings_dialog.reject()
    pump_until(lambda: worker.model.state is EngineState.BUSY, 30, "the schedule lifted")
    pump_until(lambda: not worker.model.running, 120, "the held task to finish")

    # Kinds of tasks: each framework with what it downloads, PyTorch being turned on.
    worker.open_settings()
    dialog = worker.settings_dialog
    assert dialog is not None
    dialog.tabs.setCurrentWidget(dialog.tasks)
    dialog.tasks.switches["ml_pytorch"].setChecked(True)
    pump(1)
    save(dialog, out / f"settings-tasks{suffix}.png")
    dialog.reject()

    # Disconnected, with a finished result waiting for the pool to come back.
    worker.engine_thread.submit(submit([_task("climate cell 88", 6, 32, 0.0)])).result(30)
    pump_until(lambda: len(worker.model.running) == 1, 60, "the last task")
    worker.engine_thread.submit(holder.pop("server").stop(grace=0)).result(30)
    pump_until(lambda: worker.model.waiting_results == 1, 60, "a result waiting")
    pump_until(lambda: dash.state_label.text() == "Disconnected", 60, "the disconnected header")
    pump(0.5)
    save(dash, out / f"dashboard-disconnected{suffix}.png")

    worker.stop()
    pump(1)
    worker.quit()
    deadline = time.monotonic() + 60
    while worker.engine_thread.isRunning() and time.monotonic() < deadline:
        pump(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/screenshots"))
    parser.add_argument("--dark", action="store_true", help="a dark palette")
    parser.add_argument("--wait", type=float, default=20.0, help="seconds of live data first")
    args = parser.parse_args(argv)
    if QApplication.instance() is None:
        sys.argv[1:] = []
    render(args.out, dark=args.dark, wait=args.wait)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
