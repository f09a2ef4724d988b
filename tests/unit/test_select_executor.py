"""select_executor: Docker when enabled and reachable, else the process sandbox with a reason."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from hivemind_worker.config import load_settings
from hivemind_worker.engine.executors.choice import select_executor
from hivemind_worker.engine.executors.process import ProcessExecutor
from hivemind_worker.paths import default_paths


def test_unreachable_docker_falls_back_with_a_reason(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DOCKER_HOST", f"unix://{tmp_path / 'no-docker.sock'}")
    settings = load_settings(default_paths(tmp_path), env={})
    with caplog.at_level(logging.WARNING):
        executor = select_executor(settings, "node-x")
    assert isinstance(executor, ProcessExecutor)
    assert executor.capability == "process"
    assert "Docker is not usable" in caplog.text
    assert "doctor" in caplog.text
    assert executor.notice.startswith("Docker is not usable")  # told to the person at start


def test_disabled_docker_is_not_asked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setenv("DOCKER_HOST", "tcp://192.0.2.1:9")  # would hang if it were tried
    settings = load_settings(default_paths(tmp_path), env={"DOCKER_ENABLED": "false"})
    with caplog.at_level(logging.INFO):
        executor = select_executor(settings, "node-x")
    assert isinstance(executor, ProcessExecutor)
    assert "disabled in the settings" in caplog.text
    assert executor.notice == ""  # the person chose this: nothing to tell


def test_no_docker_socket_falls_back_without_loading_the_docker_sdk(tmp_path: Path) -> None:
    # A fresh interpreter: what an idle worker without Docker has loaded.
    code = (
        "import sys, pathlib\n"
        "from hivemind_worker.config import load_settings\n"
        "from hivemind_worker.engine.executors.choice import select_executor\n"
        "from hivemind_worker.paths import default_paths\n"
        "settings = load_settings(default_paths(pathlib.Path(sys.argv[1])), env={})\n"
        "executor = select_executor(settings, 'node-x')\n"
        "print(executor.capability, 'docker' in sys.modules, 'requests' in sys.modules)\n"
        "print(executor.notice)\n"
    )
    env = {**os.environ, "DOCKER_HOST": f"unix://{tmp_path / 'none.sock'}"}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)],
        env=env, capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    first, notice = done.stdout.splitlines()[:2]
    assert first == "process False False"
    assert notice.startswith(f"Docker is not usable (no Docker engine at {tmp_path / 'none.sock'})")
