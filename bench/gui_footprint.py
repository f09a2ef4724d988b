#!/usr/bin/env python3
"""GUI footprint: the desktop app connected to a pool with nothing to do, in the tray and with
its dashboard open, against a bare Qt app doing the same in the same window of time.

A private Xvfb with a tray host (trayer), the reference pool in its own process on loopback
(default heartbeat 10 s, long-poll 30 s), the app started with `gui --hidden` and contributing
(the process sandbox). Phase one measures it in the tray only; then a second start of the app
brings its dashboard forward (the single-instance path a person takes) and phase two measures
it open. The yardstick runs beside it in each phase: a bare PySide6 app with a tray icon, and
in phase two also a shown window. CPU time per thread (schedstat) and resident memory of each
process tree; the ratios go to docs/benchmarks.md between the gui-footprint markers.

`--pythonpath DIR` runs the app from another checkout's `app/` folder (a before/after run).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _footprint import (
    Usage,
    load_line,
    local_pool,
    login,
    measure_together,
    stop,
    worker_env,
)
from _report import ROOT, write_section

from hivemind_worker.config import update_state
from hivemind_worker.paths import default_paths

sys.path.insert(0, str(ROOT / "tests"))  # the tests' Xvfb + trayer helper, reused as is
from helpers.xserver import missing_tools, xvfb_with_tray

GOALS = {"tray": (0.3, 120.0), "dashboard": (3.0, None)}  # CPU % of a core, RSS MiB
BARE_QT = """
import sys
from PySide6.QtGui import QIcon, QPixmap, QColor
from PySide6.QtWidgets import QApplication, QLabel, QMainWindow, QSystemTrayIcon
app = QApplication(sys.argv)
app.setQuitOnLastWindowClosed(False)
pixmap = QPixmap(32, 32)
pixmap.fill(QColor("#56B4E9"))
tray = QSystemTrayIcon(QIcon(pixmap))
tray.setToolTip("bare Qt")
tray.show()
if sys.argv[1] == "window":
    window = QMainWindow()
    window.setCentralWidget(QLabel("bare Qt"))
    window.resize(1040, 760)
    window.show()
app.exec()
"""


def find_line(home: Path, text: str, timeout: float, process: subprocess.Popen[bytes]) -> None:
    """Wait until some log file under `home` holds `text`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in [*home.rglob("*.log"), *home.rglob("*.jsonl")]:
            if text in path.read_text(errors="replace"):
                return
        if process.poll() is not None:
            raise RuntimeError(f"the app exited with {process.returncode}; see the logs in {home}")
        time.sleep(0.3)
    raise RuntimeError(f"no {text!r} within {timeout:.0f} s; see the logs in {home}")


def row(name: str, usage: Usage) -> str:
    return f"| {name} | {usage.cpu_percent:.3f} % | {usage.rss_mib:.1f} MiB |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="measuring window per phase")
    parser.add_argument("--settle", type=float, default=15.0, help="wait before each phase")
    parser.add_argument("--pythonpath", type=Path, help="run the app from this app/ folder")
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if missing_tools():
        raise SystemExit(f"needs {', '.join(missing_tools())} (Debian: xvfb trayer x11-utils)")
    load = load_line()
    print(f"GUI footprint, {args.seconds:.0f} s per phase; {load}", flush=True)
    results: dict[str, dict[str, Usage]] = {}
    with tempfile.TemporaryDirectory(prefix="gui-footprint-") as tmp:
        home = Path(tmp)
        with xvfb_with_tray(home / "x") as xenv, local_pool(home) as pool:
            extra = {}
            if args.pythonpath:
                extra["PYTHONPATH"] = str(args.pythonpath)
            env = worker_env(home / "worker", **extra)
            env["DISPLAY"] = xenv["DISPLAY"]
            env.pop("WAYLAND_DISPLAY", None)
            login(env, pool.address)
            # Left contributing at its last quit: it connects as it opens, as at a login.
            update_state(default_paths(home / "worker"), lambda s: s.update(contributing=True))
            gui = [sys.executable, "-m", "hivemind_worker", "gui"]
            app = bare = None
            try:
                with (home / "app.out").open("wb") as out:
                    app = subprocess.Popen([*gui, "--hidden"], env=env, stdout=out,
                                           stderr=subprocess.STDOUT)  # fmt: skip
                find_line(home / "worker", "registered node", 120, app)
                for phase in ("tray", "dashboard"):
                    kind = "tray" if phase == "tray" else "window"
                    bare = subprocess.Popen([sys.executable, "-c", BARE_QT, kind], env=env)
                    if phase == "dashboard":  # a second start brings the window forward
                        subprocess.run(gui, env=env, check=True, timeout=60,
                                       stdout=subprocess.DEVNULL)  # fmt: skip
                    measure_together({"settle": app.pid}, args.settle)
                    results[phase] = measure_together(
                        {"app": app.pid, "bare": bare.pid}, args.seconds
                    )
                    if app.poll() is not None:
                        raise RuntimeError(f"the app exited; see {home}")
                    stop(bare)
                    bare = None
            finally:
                stop(bare)
                stop(app)
    lines = [
        f"Measured {args.seconds:.0f} s per phase after {args.settle:.0f} s of settling, under "
        f"Xvfb with trayer, connected to a local pool and idle; {load} at the start"
        + (f"; app from {args.pythonpath}" if args.pythonpath else "")
        + ".",
        "",
        "| process | CPU (share of one core) | resident memory |",
        "|---|---|---|",
    ]
    notes = []
    for phase, title in (("tray", "in the tray, dashboard hidden"),
                         ("dashboard", "dashboard open")):  # fmt: skip
        app_use, bare_use = results[phase]["app"], results[phase]["bare"]
        lines.append(row(f"desktop app, {title}", app_use))
        lines.append(row(f"bare Qt app ({'tray icon' if phase == 'tray' else 'tray + window'})",
                         bare_use))  # fmt: skip
        cpu_goal, rss_goal = GOALS[phase]
        met = app_use.cpu_percent <= cpu_goal and (rss_goal is None or app_use.rss_mib <= rss_goal)
        goal = f"≤ {cpu_goal} %" + (f" and ≤ {rss_goal:.0f} MiB" if rss_goal else "")
        # A bare Qt app idles at next to nothing: below 0.005 % a CPU ratio says nothing,
        # so the difference is given instead.
        cpu = (
            f"CPU {app_use.cpu_percent / bare_use.cpu_percent:.1f}x"
            if bare_use.cpu_percent >= 0.005
            else f"CPU +{app_use.cpu_percent - bare_use.cpu_percent:.3f} % of a core"
        )
        notes.append(
            f"{title}: app against bare Qt {cpu}, memory "
            f"{app_use.rss_bytes / bare_use.rss_bytes:.2f}x; goal {goal}: "
            + ("met." if met else "not met.")
        )
    section = "\n".join([*lines, "", *(f"- {n}" for n in notes)])
    print(section)
    if not args.no_write:
        write_section("gui-footprint", "## GUI footprint (desktop app)\n\n" + section)


if __name__ == "__main__":
    os.environ.setdefault("QT_QPA_PLATFORM", "xcb")
    main()
