"""select_executor: Docker when enabled and reachable, else the process sandbox with a reason."""

from __future__ import annotations

import logging
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
