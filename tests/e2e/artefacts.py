"""Helpers for the e2e tier: where the built artefacts are, and running them as a person would."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DIST = ROOT / "dist"
CI = os.environ.get("CI", "").lower() == "true"
BUILD_HINT = "build it with `python3 build.py exe deb tarball` (.ci/run does)"


def unavailable(reason: str) -> None:
    """Skip on a developer's machine; under CI a missing artefact or tool is a failure."""
    if CI:
        pytest.fail(f"{reason} (CI=true: the e2e tier must not skip)")
    pytest.skip(reason)


def clean_env(home: Path, **extra: str) -> dict[str, str]:
    """What a fresh login shell would have: no venv, no display, the system's own PATH.

    PATH=/usr/bin:/bin matters: without Docker the frozen worker runs python tasks with
    the system's python3, and it must find that one, not a venv's or pyenv's.
    """
    env = {
        "HOME": str(home),
        "PATH": os.environ["PATH"] if os.name == "nt" else "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        # The demo's sample image would come from a registry these machines cannot reach.
        "DOCKER_ENABLED": "false",
        # The demo's ml and data samples download their environments on first use; only the
        # test of them (test_binary.py) turns them on.
        "HIVEMIND_ML_SCIKIT_LEARN": "false",
        "HIVEMIND_DATA_PROCESSING": "false",
    }
    env.update(extra)
    return env


def run(cmd: list[str | Path], *, env: dict[str, str] | None = None, timeout: float = 120):  # type: ignore[no-untyped-def]
    return subprocess.run(
        [str(c) for c in cmd],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def check_demo(exe: str | Path, home: Path, tasks: int = 6) -> None:
    """The headless demo with only this binary: its own pool process, its worker, every task."""
    data = home / "worker-data"
    done = run(
        [exe, "--data-dir", data, "demo", "--headless", "--tasks", str(tasks)],
        env=clean_env(home),
        timeout=240,
    )
    report = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert f"Done: {tasks} of {tasks} tasks succeeded." in done.stdout, report
