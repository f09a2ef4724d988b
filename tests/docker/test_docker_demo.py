"""The demo with Docker present: Docker when the Python image is there, else it says why not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from helpers.images import TEST_IMAGE

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]


def demo(home: Path, image: str, tasks: int) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "HIVEMIND_HOME": str(home),
        "DOCKER_ENABLED": "true",
        "DOCKER_PYTHON_IMAGE": image,
        "DOCKER_PULL_POLICY": "never",  # no registry is reachable here, and none may be tried
    }
    return subprocess.run(
        [sys.executable, "-m", "hivemind_worker", "demo", "--headless", "--tasks", str(tasks)],
        capture_output=True, text=True, env=env, timeout=200, check=False,
    )  # fmt: skip


def test_demo_runs_in_docker_with_the_python_image(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    # One task: the test image has python3-minimal, without the modules the others import.
    done = demo(tmp_path, TEST_IMAGE, 1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Done: 1 of 1 tasks succeeded." in done.stdout
    log = (tmp_path / "logs" / "worker.jsonl").read_text()
    assert "docker sandbox" in log or "task containers" in log
    assert "process sandbox instead" not in log


def test_demo_without_the_python_image_falls_back_and_says_why(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    done = demo(tmp_path, "hivemind-no-such-image:never", 2)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Done: 2 of 2 tasks succeeded." in done.stdout
    assert "process sandbox instead" in done.stderr  # a warning the person sees
    assert "hivemind-no-such-image:never" in done.stderr
