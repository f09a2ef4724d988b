#!/usr/bin/env python3
"""Run the whole test suite again and again, quiet and under a CPU burner, to find flaky tests.

    python3 tools/test_loop.py --runs 5 --burned 3 --out /tmp/loop

Each run is `python3 build.py test` (lint, types, the whole suite) with a JUnit report; a
burned run first starts one busy process per core (niced 0, as a person's own program would
be) and stops it after. The summary lists every run's outcome and, per test that failed at
least once, in which runs: a test that fails in one run of eight is the flake to fix at its
cause. Written to OUT/summary.md and printed; the exit status is 1 if any run failed.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def burn(stop_at: float) -> None:
    """Keep one core busy until `stop_at` (the loop's bound) or until terminated."""
    x = 0
    while time.time() < stop_at:
        for _ in range(100_000):
            x = (x * 31 + 7) % 1_000_003


def failures(report: Path) -> list[str]:
    """The test ids that failed or errored in a JUnit report."""
    if not report.exists():
        return ["(no report: the run stopped before pytest finished)"]
    bad = []
    for case in ET.parse(report).getroot().iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            bad.append(f"{case.get('classname')}::{case.get('name')}")
    return bad


def summary_line(log: Path) -> str:
    lines = [line for line in log.read_text(errors="replace").splitlines() if " in " in line]
    marked = [line for line in lines if "passed" in line or "failed" in line]
    return marked[-1].strip("= ") if marked else "(no pytest summary)"


def one_run(index: int, burned: bool, out: Path, pytest_args: list[str]) -> dict[str, object]:
    log = out / f"run-{index:02d}{'-burned' if burned else ''}.log"
    report = log.with_suffix(".xml")
    burners: list[multiprocessing.Process] = []
    if burned:
        stop_at = time.time() + 3 * 3600  # bounded even if this process is killed
        burners = [
            multiprocessing.Process(target=burn, args=(stop_at,), daemon=True)
            for _ in range(os.cpu_count() or 1)
        ]
        for process in burners:
            process.start()
    load = os.getloadavg()[0]
    started = time.monotonic()
    try:
        with log.open("wb") as sink:
            code = subprocess.call(
                [sys.executable, "build.py", "test", f"--junitxml={report}", *pytest_args],
                cwd=ROOT, stdout=sink, stderr=subprocess.STDOUT,
            )  # fmt: skip
    finally:
        for process in burners:
            process.terminate()
            process.join(10)
    return {
        "run": index,
        "burned": burned,
        "code": code,
        "minutes": (time.monotonic() - started) / 60,
        "load": load,
        "summary": summary_line(log),
        "failed": failures(report) if code else [],
        "log": log,
    }


def write_summary(results: list[dict[str, object]], out: Path) -> str:
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"],
        cwd=ROOT, capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    lines = [
        f"# Test loop on {os.uname().nodename}, commit {commit}",
        "",
        "| run | CPU burner | exit | minutes | load at start | pytest |",
        "|---|---|---|---|---|---|",
    ]
    flaky: dict[str, list[int]] = defaultdict(list)
    for r in results:
        lines.append(
            f"| {r['run']} | {'yes' if r['burned'] else 'no'} | {r['code']} | "
            f"{r['minutes']:.1f} | {r['load']:.1f} | {r['summary']} |"
        )
        for test in r["failed"]:  # type: ignore[attr-defined]
            flaky[test].append(int(r["run"]))  # type: ignore[call-overload]
    lines += ["", "Failed at least once:" if flaky else "No test failed."]
    lines += [f"- {test}: runs {', '.join(map(str, runs))}" for test, runs in sorted(flaky.items())]
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="quiet runs (default 5)")
    parser.add_argument("--burned", type=int, default=3, help="runs under a CPU burner (3)")
    parser.add_argument("--out", type=Path, default=Path("test-loop"), help="logs and summary")
    parser.add_argument("pytest_args", nargs="*", help="passed on to pytest (after --)")
    args = parser.parse_args()
    if args.runs < 0 or args.burned < 0 or args.runs + args.burned == 0:
        parser.error("--runs and --burned must be 0 or more, and not both 0")
    args.out.mkdir(parents=True, exist_ok=True)
    plan = [False] * args.runs + [True] * args.burned
    results = []
    for index, burned in enumerate(plan, 1):
        print(f"run {index}/{len(plan)}{' under a CPU burner' if burned else ''}...", flush=True)
        results.append(one_run(index, burned, args.out.resolve(), args.pytest_args))
        print(f"  {results[-1]['summary']}", flush=True)
        write_summary(results, args.out)  # kept up to date: the loop may be stopped
    print(write_summary(results, args.out), end="")
    return 1 if any(r["code"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
