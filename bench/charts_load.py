#!/usr/bin/env python3
"""How long the GUI thread stops while the dashboard's charts load, against loading them
all on the GUI thread (what an app without a loader does), in the same run.

Each sample is a fresh interpreter on Qt's offscreen platform with the app's windows'
modules already imported (as when the dashboard first shows), a 5 ms timer ticking on the
GUI thread, then the charts' module loaded one of two ways:
- `gui-thread`: `import hivemind_worker.gui.charts` on the GUI thread (the baseline);
- `loader`: `ChartsLoader` (NumPy and the standard modules off the GUI thread, pyqtgraph on
  it: PySide's type objects may only be built there).
The longest gap between ticks is how long the window could not paint or take input.
Cells alternate so a noisy machine weighs on both alike; medians go to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

from _report import write_section

CHILD = """
import itertools, sys, time
from PySide6.QtCore import QTimer
from PySide6.QtWidgets import QApplication
app = QApplication([])
import hivemind_worker.gui.dashboard  # the window is up: its modules are in
ticks, marks = [], {}
timer = QTimer()
timer.setInterval(5)
timer.timeout.connect(lambda: ticks.append(time.monotonic()))
timer.start()

def done():
    marks["done"] = time.monotonic()
    QTimer.singleShot(200, app.quit)

def go():
    marks["start"] = time.monotonic()
    if sys.argv[1] == "gui-thread":
        import hivemind_worker.gui.charts
        done()
    else:
        from hivemind_worker.gui.charts_loader import ChartsLoader
        loader = ChartsLoader.instance()
        loader.loaded.connect(done)
        loader.start()

QTimer.singleShot(300, go)
QTimer.singleShot(60_000, lambda: app.exit(3))
code = app.exec()
loading = [t for t in ticks if marks["start"] - 0.05 <= t <= marks["done"] + 0.05]
gap = max(b - a for a, b in itertools.pairwise(loading))
print(f"{gap * 1000:.1f} {(marks['done'] - marks['start']) * 1000:.1f}")
sys.exit(code)
"""
CELLS = ("gui-thread", "loader")


def sample(cell: str) -> tuple[float, float]:
    env = {**os.environ, "QT_QPA_PLATFORM": "offscreen"}
    done = subprocess.run(
        [sys.executable, "-c", CHILD, cell], env=env, capture_output=True, text=True,
        timeout=120, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        sys.exit(f"the {cell} sample failed ({done.returncode}): {done.stderr.strip()}")
    gap, total = (float(x) for x in done.stdout.split())
    return gap, total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    args = parser.parse_args()
    results: dict[str, list[tuple[float, float]]] = {cell: [] for cell in CELLS}
    for _ in range(args.runs):
        for cell in CELLS:
            results[cell].append(sample(cell))
    gap = {cell: statistics.median(g for g, _ in results[cell]) for cell in CELLS}
    total = {cell: statistics.median(t for _, t in results[cell]) for cell in CELLS}
    load = os.getloadavg()[0]
    rows = "\n".join(
        f"| {label} | {gap[cell]:.0f} ms | {gap[cell] / gap['gui-thread']:.2f}x | "
        f"{total[cell]:.0f} ms |"
        for cell, label in (
            ("gui-thread", "baseline: all imported on the GUI thread"),
            ("loader", "the app: `ChartsLoader` (NumPy off the GUI thread, pyqtgraph on it)"),
        )
    )
    section = f"""## The charts' load and the GUI thread (`bench/charts_load.py`)

Measured {time.strftime("%Y-%m-%d")} on {sys.platform}, {os.cpu_count()} CPUs (load average \
{load:.1f} at the end), {args.runs} runs per cell, alternating, medians. Each run is a fresh \
interpreter (offscreen Qt) with the windows' modules in and a 5 ms timer on the GUI thread; \
the longest gap between its ticks while the charts' module loads is how long the window could \
not paint or take input.

| charts loaded by | longest GUI-thread gap | x baseline | until loaded |
|---|---|---|---|
{rows}

pyqtgraph's import builds PySide's type objects (it reads every attribute of QtCore, QtGui \
and QtWidgets) and defines Qt classes, so it runs on the GUI thread: the app once imported \
it on a worker thread, which crashed it now and then (a segfault in PySide while the window \
took focus). NumPy and the standard modules pyqtgraph needs still load off the GUI thread."""
    write_section("charts-load", section)
    print(section)


if __name__ == "__main__":
    main()
