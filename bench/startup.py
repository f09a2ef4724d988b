#!/usr/bin/env python3
"""Start-up of the one-file and one-folder builds, cold and warm, to `--version` and to a window.

Like hyperfine: warm-up runs, then N timed runs per cell, medians reported. "Cold" drops
the build's files from the page cache before every run (posix_fadvise DONTNEED, no root
needed), so the kernel reads them from disk again, as on the first start after a boot;
"warm" runs back to back. A one-file build unpacks itself into a fresh temporary folder on
every start either way. "To a window" starts the desktop app (`gui`) on a private Xvfb and
times until its dashboard is mapped (an X MapNotify for a window named "HiveMind Worker").

Baselines measured in the same run, so the ratios hold on a busy machine too: a bare
interpreter start (`python3 -I -c pass`) for the command line, and a bare PySide6 window
from the venv (import, QApplication, one shown QWidget) for the desktop app. Results go to
docs/benchmarks.md between the startup markers.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from _report import write_section

ROOT = Path(__file__).resolve().parents[1]
EXE = "hivemind-worker.exe" if os.name == "nt" else "hivemind-worker"
ONE_FILE = ROOT / "dist" / EXE
ONE_FOLDER = ROOT / "dist" / "hivemind-worker-onedir" / EXE
WINDOW_TITLE = b"HiveMind Worker"
BARE_WINDOW = (
    "from PySide6.QtWidgets import QApplication, QWidget\n"
    "app = QApplication([])\n"
    "w = QWidget()\n"
    "w.setWindowTitle('HiveMind Worker')\n"
    "w.show()\n"
    "app.exec()\n"
)


def files_of(program: Path) -> list[Path]:
    """What a start reads: the one-file executable, or the whole one-folder app."""
    if program.parent.name == "hivemind-worker-onedir":
        return [p for p in program.parent.rglob("*") if p.is_file() and not p.is_symlink()]
    return [program]


def evict(paths: list[Path]) -> None:
    """Drop the files' pages from the page cache so the next start reads them from disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def median_ms(times: list[float]) -> str:
    return f"{statistics.median(times) * 1000:.0f} ms"


Cell = tuple[str, Callable[[], float], list[Path] | None]  # name, one start, files to evict


def interleaved(cells: list[Cell], runs: int, warmup: int) -> dict[str, list[float]]:
    """Times per cell, taken round-robin so that every cell sees the same load.

    On a shared machine the load drifts within seconds; timing the baseline first and the
    builds later would put the drift into the ratios.
    """
    for _ in range(warmup):
        for _name, start, _cold in cells:
            start()
    times: dict[str, list[float]] = {name: [] for name, _start, _cold in cells}
    for _ in range(runs):
        for name, start, cold in cells:
            if cold is not None:
                evict(cold)
            times[name].append(start())
    return times


def command(cmd: list[str], env: dict[str, str]) -> Callable[[], float]:
    def once() -> float:
        began = time.perf_counter()
        quiet = subprocess.DEVNULL
        subprocess.run(cmd, env=env, stdout=quiet, stderr=quiet, check=True)
        return time.perf_counter() - began

    return once


# ---------------------------------------------------------------------------- windows


class X11:
    """Just enough Xlib (ctypes, no extra package) to see top-level windows being mapped."""

    SUBSTRUCTURE_NOTIFY_MASK = 1 << 19
    MAP_NOTIFY = 19

    def __init__(self, display: str) -> None:
        name = ctypes.util.find_library("X11")
        if name is None:
            raise OSError("libX11 is not installed")
        lib = ctypes.CDLL(name)
        lib.XOpenDisplay.restype = ctypes.c_void_p
        lib.XOpenDisplay.argtypes = [ctypes.c_char_p]
        lib.XDefaultRootWindow.restype = ctypes.c_ulong
        lib.XDefaultRootWindow.argtypes = [ctypes.c_void_p]
        lib.XSelectInput.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.c_long]
        lib.XPending.argtypes = [ctypes.c_void_p]
        lib.XNextEvent.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        lib.XFetchName.argtypes = [ctypes.c_void_p, ctypes.c_ulong, ctypes.POINTER(ctypes.c_char_p)]
        lib.XFree.argtypes = [ctypes.c_void_p]
        lib.XFlush.argtypes = [ctypes.c_void_p]
        lib.XCloseDisplay.argtypes = [ctypes.c_void_p]
        self.lib = lib
        self.display = lib.XOpenDisplay(display.encode())
        if not self.display:
            raise OSError(f"cannot open X display {display}")
        lib.XSelectInput(
            self.display, lib.XDefaultRootWindow(self.display), self.SUBSTRUCTURE_NOTIFY_MASK
        )
        lib.XFlush(self.display)
        self.event = (ctypes.c_long * 24)()  # XEvent is a union of 24 longs

    def drain(self) -> None:
        while self.lib.XPending(self.display):
            self.lib.XNextEvent(self.display, self.event)

    def wait_for_map(self, title: bytes, deadline: float) -> bool:
        """Until a top-level window titled `title` is mapped, or the deadline passes."""
        while time.perf_counter() < deadline:
            while self.lib.XPending(self.display):
                self.lib.XNextEvent(self.display, self.event)
                # XMapEvent: int type (in a long), serial, send_event, display, event, window.
                if self.event[0] & 0x7F != self.MAP_NOTIFY:
                    continue
                name = ctypes.c_char_p()
                if self.lib.XFetchName(self.display, self.event[5], ctypes.byref(name)):
                    found = name.value == title
                    self.lib.XFree(name)
                    if found:
                        return True
            time.sleep(0.002)
        return False

    def close(self) -> None:
        self.lib.XCloseDisplay(self.display)


@contextlib.contextmanager
def xvfb() -> Iterator[str]:
    """A private X server; yields its DISPLAY."""
    read, write = os.pipe()
    server = subprocess.Popen(
        ["Xvfb", "-displayfd", str(write), "-screen", "0", "1400x1000x24", "-nolisten", "tcp"],
        pass_fds=(write,),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    os.close(write)
    try:
        with os.fdopen(read) as pipe:
            number = pipe.readline().strip()
        if not number:
            raise OSError("Xvfb did not start")
        yield f":{number}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def window(cmd: list[str], env: dict[str, str], x11: X11) -> Callable[[], float]:
    def once() -> float:
        x11.drain()
        began = time.perf_counter()
        app = subprocess.Popen(
            cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True,
        )  # fmt: skip
        try:
            shown = x11.wait_for_map(WINDOW_TITLE, began + 60)
            elapsed = time.perf_counter() - began
        finally:
            # SIGTERM quits the app as its tray menu does (and lets a one-file build clean
            # up its temporary folder); the next run must not find it still running.
            with contextlib.suppress(ProcessLookupError):
                os.killpg(app.pid, signal.SIGTERM)
            try:
                app.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(app.pid, signal.SIGKILL)
                app.wait()
        if not shown:
            raise RuntimeError(f"no window from {' '.join(cmd)} within 60 s")
        return elapsed

    return once


# ---------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-n", "--runs", type=int, default=10, help="timed runs (default 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--window-runs", type=int, default=5, help="timed runs to a window")
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        metavar="BINARY",
        help="another build to time warm, e.g. dist/hivemind-worker-zlib "
        "(HIVEMIND_BENCH_VARIANTS=1 python3 build.py exe)",
    )
    parser.add_argument("--no-window", action="store_true", help="skip the desktop app")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument(
        "--venv",
        action="store_true",
        help="only the development install (`hivemind-worker gui` from the venv) to a window, "
        "against a bare PySide6 window; printed, not written (no build needed)",
    )
    args = parser.parse_args()
    if args.venv:
        venv_windows(args.window_runs)
        return
    for program in (ONE_FILE, ONE_FOLDER):
        if not program.exists():
            sys.exit(f"{program.relative_to(ROOT)} is missing: run `python3 build.py exe` first")

    # Other work on the machine skews every start; say how busy it was before we began.
    load = f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "load n/a"
    python = shutil.which("python3") or sys.executable
    home = Path(tempfile.mkdtemp(prefix="hivemind-startup-"))
    env = {**os.environ, "HOME": str(home), "HIVEMIND_HOME": str(home / "hw")}
    env.pop("DISPLAY", None)
    builds = [("one-folder (installers)", ONE_FOLDER), ("one-file (download and run)", ONE_FILE)]
    rows = []
    try:
        cells: list[Cell] = [("base", command([python, "-I", "-c", "pass"], env), None)]
        for label, program in builds:
            version = command([str(program), "--version"], env)
            cells += [
                (f"{label} cold", version, files_of(program)),
                (f"{label} warm", version, None),
                (f"{label} help", command([str(program), "run", "--help"], env), None),
            ]
        others = [path.resolve() for path in args.compare]
        cells += [(str(o), command([str(o), "--version"], env), None) for o in others]
        cli = interleaved(cells, args.runs, args.warmup)
        windows: dict[str, list[float]] = {}
        if not args.no_window and shutil.which("Xvfb"):
            windows = time_windows(builds, env, home, args)
    finally:
        shutil.rmtree(home, ignore_errors=True)

    base_ms = statistics.median(cli["base"])
    base_cell = median_ms(cli["base"])
    rows.append(f"| baseline: `python3 -I -c pass` | - | {base_cell} | 1.0x | - | - | - |")
    bare_window = windows.get("bare", [])
    for label, program in builds:
        warm = cli[f"{label} warm"]
        shown, shown_cold = windows.get(f"{label} warm"), windows.get(f"{label} cold")
        window_cells = "-"
        if shown and bare_window:
            ratio = statistics.median(shown) / statistics.median(bare_window)
            window_cells = f"{median_ms(shown)} ({ratio:.1f}x)"
        rows.append(
            f"| {label}: `{program.relative_to(ROOT)}` | {median_ms(cli[f'{label} cold'])} | "
            f"{median_ms(warm)} | {statistics.median(warm) / base_ms:.1f}x | "
            f"{median_ms(cli[f'{label} help'])} | {window_cells} | "
            f"{median_ms(shown_cold) if shown_cold else '-'} |"
        )
    if bare_window:
        rows.append(
            f"| baseline: a bare PySide6 window (venv) | - | - | - | - | "
            f"{median_ms(bare_window)} (1.0x) | - |"
        )
    compared = []
    for other in others:
        warm = cli[str(other)]
        shown_name = other.relative_to(ROOT) if other.is_relative_to(ROOT) else other
        compared.append(
            f"| `{shown_name} --version` | {other.stat().st_size / 1e6:.1f} MB | "
            f"{median_ms(warm)} | {statistics.median(warm) / base_ms:.1f}x |"
        )

    folder_mb = sum(p.stat().st_size for p in files_of(ONE_FOLDER)) / 1e6
    section = "\n".join(
        [
            "## Start-up (`bench/startup.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {sys.platform}, {os.cpu_count()} CPUs "
            f"({load} at the start), {args.runs} runs per command cell and "
            f"{args.window_runs} per window cell after warm-up runs, medians. "
            f"`dist/{ONE_FILE.name}`: **{ONE_FILE.stat().st_size / 1e6:.1f} MB**; the "
            f"one-folder app: **{folder_mb:.1f} MB** in its folder. Cold: the build's files "
            "evicted from the page cache before each run; warm: back to back. Ratios: warm "
            "`--version` against a bare interpreter start, the window against a bare PySide6 "
            "window, both measured in the same run.",
            "",
            "| build | `--version` cold | `--version` warm | x interpreter | "
            "`run --help` warm | to a window, warm (x bare Qt) | to a window, cold |",
            "|---|---|---|---|---|---|---|",
            *rows,
            "",
            "The installers (.deb, tarball, Windows) ship the one-folder build: it unpacks "
            "nothing at start. The one-file executable unpacks its ~200 MB of libraries "
            "(Python, Qt, NumPy for the charts, gRPC) into a temporary folder at every start, "
            "so it stores them uncompressed: inflating them cost more than writing them. "
            "`--version` alone skips the CLI's imports (installer/entry.py).",
            *(
                [
                    "",
                    "Other builds of the same spec, warm, for comparison:",
                    "",
                    "| command | size | warm | x interpreter |",
                    "|---|---|---|---|",
                    *compared,
                ]
                if compared
                else []
            ),
        ]
    )
    print(section)
    if not args.no_write:
        write_section("startup", section)


def time_windows(
    builds: list[tuple[str, Path]], env: dict[str, str], home: Path, args: argparse.Namespace
) -> dict[str, list[float]]:
    """Time to a mapped window for each build (warm and cold) and for a bare PySide6 window."""
    with xvfb() as display:
        x11 = X11(display)
        try:
            shown_env = {**env, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"}
            cells: list[Cell] = [
                ("bare", window([sys.executable, "-c", BARE_WINDOW], shown_env, x11), None)
            ]
            for label, program in builds:
                data = home / f"data-{program.parent.name}"
                start = window([str(program), "--data-dir", str(data), "gui"], shown_env, x11)
                cells += [
                    (f"{label} cold", start, files_of(program)),
                    (f"{label} warm", start, None),
                ]
            return interleaved(cells, args.window_runs, 1)
        finally:
            x11.close()


def venv_windows(runs: int) -> None:
    """The venv's desktop app to a window, interleaved with a bare PySide6 window."""
    home = Path(tempfile.mkdtemp(prefix="hivemind-startup-"))
    env = {**os.environ, "HOME": str(home), "HIVEMIND_HOME": str(home / "hw")}
    program = Path(sys.executable).parent / EXE
    try:
        with xvfb() as display:
            x11 = X11(display)
            try:
                shown_env = {**env, "DISPLAY": display, "QT_QPA_PLATFORM": "xcb"}
                data = home / "data"
                # A returning person's start (settings saved): the dashboard, not the setup.
                from hivemind_worker.config import load_settings, save_settings
                from hivemind_worker.paths import default_paths

                paths = default_paths(data)
                paths.ensure()
                save_settings(paths, load_settings(paths, env={}))
                cells: list[Cell] = [
                    ("bare", window([sys.executable, "-c", BARE_WINDOW], shown_env, x11), None),
                    (
                        "venv",
                        window([str(program), "--data-dir", str(data), "gui"], shown_env, x11),
                        None,
                    ),
                ]
                times = interleaved(cells, runs, 1)
            finally:
                x11.close()
    finally:
        shutil.rmtree(home, ignore_errors=True)
    bare, venv = statistics.median(times["bare"]), statistics.median(times["venv"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average {load:.1f}; {runs} runs each, medians")
    print(f"bare PySide6 window: {bare * 1000:.0f} ms (1.0x)")
    print(f"venv `hivemind-worker gui` to a window: {venv * 1000:.0f} ms ({venv / bare:.2f}x)")


if __name__ == "__main__":
    main()
