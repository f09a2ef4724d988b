#!/usr/bin/env python3
"""Start-up benchmark of the one-file executable: its size, cold and warm start times.

Like hyperfine: warm-up runs, then N timed runs of each command, medians reported. "Cold"
evicts the binary from the page cache before every run (posix_fadvise DONTNEED, no root
needed), so the kernel reads it from disk again, as on the first start after a reboot;
"warm" runs straight after each other. A onefile binary unpacks itself into a fresh
temporary folder on every start either way, so that part is in both. Results go to
docs/benchmarks.md between the startup markers.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _report import write_section

ROOT = Path(__file__).resolve().parents[1]
BINARY = ROOT / "dist" / ("hivemind-worker.exe" if os.name == "nt" else "hivemind-worker")
COMMANDS = (["--version"], ["run", "--help"])


def evict(path: Path) -> None:
    """Drop the file's pages from the page cache so the next start reads it from disk."""
    if not hasattr(os, "posix_fadvise"):
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(cmd: list[str], env: dict[str, str]) -> float:
    start = time.perf_counter()
    subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, check=True)
    return time.perf_counter() - start


def measure(cmd: list[str], runs: int, warmup: int, *, cold: bool, binary: Path) -> list[float]:
    with tempfile.TemporaryDirectory() as home:
        env = {**os.environ, "HOME": home, "HIVEMIND_HOME": home}
        for _ in range(warmup):
            timed(cmd, env)
        times = []
        for _ in range(runs):
            if cold:
                evict(binary)
            times.append(timed(cmd, env))
        return times


def fmt(seconds: float) -> str:
    return f"{seconds * 1000:.0f} ms"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--binary", type=Path, default=BINARY)
    parser.add_argument("-n", "--runs", type=int, default=10, help="timed runs (default 10)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument(
        "--compare",
        type=Path,
        action="append",
        default=[],
        metavar="BINARY",
        help="another build to time warm, e.g. the one-folder variant "
        "(HIVEMIND_ONEDIR=1 pyinstaller installer/hivemind-worker.spec)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only")
    args = parser.parse_args()
    if not args.binary.exists():
        sys.exit(f"{args.binary} is missing: run `python3 build.py exe` first")
    binary = args.binary.resolve()

    # Other work on the machine skews every start; say how busy it was before we began.
    load = f"load average {os.getloadavg()[0]:.1f}" if hasattr(os, "getloadavg") else "load n/a"
    rows = []
    for sub in COMMANDS:
        cold = measure([str(binary), *sub], args.runs, args.warmup, cold=True, binary=binary)
        warm = measure([str(binary), *sub], args.runs, args.warmup, cold=False, binary=binary)
        source = measure(
            [sys.executable, "-m", "hivemind_worker", *sub], args.runs, args.warmup,
            cold=False, binary=binary,
        )  # fmt: skip
        rows.append(
            f"| `hivemind-worker {' '.join(sub)}` | {fmt(statistics.median(cold))} | "
            f"{fmt(statistics.median(warm))} (min {fmt(min(warm))}) | "
            f"{fmt(statistics.median(source))} |"
        )
    others = []
    for other in (path.resolve() for path in args.compare):
        for sub in COMMANDS:
            warm = measure([str(other), *sub], args.runs, args.warmup, cold=False, binary=other)
            label = other.relative_to(ROOT) if other.is_relative_to(ROOT) else other
            others.append(
                f"| `{label} {' '.join(sub)}` | {fmt(statistics.median(warm))} "
                f"(min {fmt(min(warm))}) |"
            )
    size = binary.stat().st_size
    section = "\n".join(
        [
            "## Start-up of the one-file executable (`bench/startup.py`)",
            "",
            f"Measured {time.strftime('%Y-%m-%d')} on {sys.platform}, {os.cpu_count()} CPUs "
            f"({load}), "
            f"{args.runs} runs per cell after {args.warmup} warm-up runs, medians. "
            f"`dist/{binary.name}`: **{size / 1e6:.1f} MB**. Cold: the binary evicted from "
            "the page cache before each run; warm: back to back. The last column is the same "
            "command from the source tree (`python -m hivemind_worker`) for comparison.",
            "",
            "| command | cold | warm | from source |",
            "|---|---|---|---|",
            *rows,
            "",
            "A one-file build unpacks its archive (Python, Qt, NumPy for the charts, gRPC) into "
            "a temporary folder on every start, so start time follows the unpacked size: "
            "unused Qt modules, plugins and translations are left out, the GTK platform "
            "theme (which drags in GTK 3) too, and binaries are stripped. UPX is off because "
            "it would trade a smaller file for decompressing every library again at each "
            "start.",
            *(
                [
                    "",
                    "Other builds of the same spec, warm, for comparison. A one-folder build "
                    "(`HIVEMIND_ONEDIR=1`) unpacks nothing at start; the installers, which own "
                    "a folder anyway, could ship it for a several times faster start at about "
                    "2.5 times the installed size (and lintian overrides for the vendored "
                    "libraries).",
                    "",
                    "| command | warm |",
                    "|---|---|",
                    *others,
                ]
                if others
                else []
            ),
        ]
    )
    print(section)
    if not args.no_write:
        write_section("startup", section)


if __name__ == "__main__":
    main()
