"""Render the dashboard (with real tasks running) and the settings dialog to PNG files."""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import keyring
from keyring.backend import KeyringBackend
from PySide6.QtCore import QCoreApplication, QEventLoop
from PySide6.QtGui import QColor, QPalette
from PySide6.QtWidgets import QApplication, QStyleFactory, QWidget

from hivemind_worker.config import load_settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.engine.engine import WorkerEngine
from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.gui.app import WorkerApp, make_qapplication
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
        overrides={"max_concurrent_tasks": "3", "max_cpu_cores": "2", "account": USER},
    )
    credentials = CredentialStore(paths, allow_plaintext_fallback=False)
    engine = WorkerEngine(
        settings,
        node_id="node-screenshots",
        credentials=credentials,
        executor=ProcessExecutor(settings.work_dir),
        outbox_dir=paths.outbox_dir,
    )
    holder: dict[str, object] = {}

    async def before() -> None:
        from hivemind_worker.engine.pool_client import NodePoolClient
        from hivemind_worker.pool.client import TaskQueueClient
        from hivemind_worker.pool.server import PoolConfig, PoolServer
        from hivemind_worker.pool.store import PoolStore

        db = home / "pool.db"
        store = PoolStore(db)
        store.add_user(USER, PASSWORD)
        store.close()
        server = PoolServer(PoolConfig(db_path=db, listen="127.0.0.1:0", heartbeat_interval=1))
        await server.start()
        holder["server"] = server
        client = NodePoolClient(server.address)
        token = (await client.login(USER, PASSWORD)).token
        await client.close()
        await asyncio.to_thread(credentials.set_token, server.address, USER, token)
        worker.set_settings_from_loop(
            dataclasses.replace(settings, node_pool_address=server.address)
        )
        queue = TaskQueueClient(server.address)
        await queue.login(USER, PASSWORD)
        for spec in (
            _task("warm-up 1", 1, 16, 0),
            _task("warm-up 2", 1, 16, 0),
            _task("warm-up 3", 2, 16, 0),
            _task("protein fold #4812", 120, 220, 0.0),
            _task("render tile 17/64", 120, 120, 0.004),
            _task("monte carlo batch 9", 120, 60, 0.012),
        ):
            await queue.submit(spec)
        await queue.close()

    async def after() -> None:
        server = holder.get("server")
        if server is not None:
            await server.stop()  # type: ignore[attr-defined]

    worker = WorkerApp(settings, paths, credentials, engine, autostart_engine=True,
                       before=before, after=after, show_tray=False)  # fmt: skip
    worker.start_engine()
    worker.dashboard.resize(1180, 820)
    pump(wait)
    suffix = "-dark" if dark else ""
    out.mkdir(parents=True, exist_ok=True)
    save(worker.dashboard, out / f"dashboard{suffix}.png")
    worker.dashboard.tabs.setCurrentIndex(2)
    save(worker.dashboard, out / f"dashboard-log{suffix}.png")
    worker.dashboard.tabs.setCurrentIndex(0)
    worker.open_settings()
    dialog = worker.settings_dialog
    assert dialog is not None
    pump(1.5)  # the login status arrives from the engine thread
    save(dialog, out / f"settings{suffix}.png")
    dialog.address.setText("pool.example.org")  # an invalid value, flagged inline
    save(dialog, out / f"settings-invalid{suffix}.png")
    dialog.reject()
    worker.stop()
    pump(2)
    worker.quit()
    deadline = time.monotonic() + 60
    while worker.engine_thread.isRunning() and time.monotonic() < deadline:
        pump(0.2)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path, nargs="?", default=Path("docs/screenshots"))
    parser.add_argument("--dark", action="store_true", help="a dark palette")
    parser.add_argument("--wait", type=float, default=25.0, help="seconds of live data first")
    args = parser.parse_args(argv)
    if QApplication.instance() is None:
        sys.argv[1:] = []
    render(args.out, dark=args.dark, wait=args.wait)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
