"""The demo with Docker present: Docker when the Python image is there, else it says why not."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import docker
import pytest

from helpers.images import STDLIB_IMAGE, TEST_IMAGE, remove_runner_images

pytestmark = [pytest.mark.docker, pytest.mark.timeout(240)]


def demo(
    home: Path, image: str, tasks: int, timeout: float = 200, **settings: str
) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        **settings,
        "HIVEMIND_HOME": str(home),
        "DOCKER_ENABLED": "true",
        "DOCKER_PYTHON_IMAGE": image,
        "DOCKER_PULL_POLICY": "never",  # no registry is reachable here, and none may be tried
    }
    return subprocess.run(
        [sys.executable, "-m", "hivemind_worker", "demo", "--headless", "--tasks", str(tasks)],
        capture_output=True, text=True, env=env, timeout=timeout, check=False,
    )  # fmt: skip


def test_demo_runs_in_docker_with_the_python_image(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    # One task: the test image has python3-minimal, without the modules the others import.
    done = demo(tmp_path, TEST_IMAGE, 1)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Done: 1 of 1 tasks succeeded." in done.stdout
    # The ml and data samples are not left waiting for a worker that cannot take them.
    assert (
        f"random forest on iris (scikit-learn): skipped, the Python in {TEST_IMAGE} lacks the "
        "standard library the ml and data runners need" in done.stdout
    )
    log = (tmp_path / "logs" / "worker.jsonl").read_text()
    assert "docker sandbox" in log or "task containers" in log
    assert "process sandbox instead" not in log


def test_demo_without_the_python_image_falls_back_and_says_why(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    # The ml and data samples off: in the process sandbox they would run, building their
    # environments first (tests/integration/test_runners.py runs them).
    off = {"HIVEMIND_ML_SCIKIT_LEARN": "false", "HIVEMIND_DATA_PROCESSING": "false"}
    done = demo(tmp_path, "hivemind-no-such-image:never", 2, **off)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Done: 2 of 2 tasks succeeded." in done.stdout
    assert "process sandbox instead" in done.stderr  # a warning the person sees
    assert "hivemind-no-such-image:never" in done.stderr


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_demo_runs_the_ml_and_data_samples_in_docker(
    tmp_path: Path, docker_client: docker.DockerClient
) -> None:
    """With a Python image that has the whole standard library, the runner samples run in
    containers too: their environments built, copied into images, the metrics printed."""
    remove_runner_images(docker_client)  # a run killed midway leaves them: this one builds
    try:
        done = demo(tmp_path, STDLIB_IMAGE, 1, timeout=840)  # its images go even if it hangs
        assert done.returncode == 0, done.stdout + done.stderr
        assert "Done: 3 of 3 tasks succeeded." in done.stdout
        forest = "random forest on iris (scikit-learn)"
        assert f"{forest}: preparing: scikit-learn: copying the scikit-learn environment" in (
            done.stdout
        )
        assert f"{forest}: random-forest-classifier on the iris data set: accuracy " in (
            done.stdout
        )
        assert "sales by region (csv analysis): sales.csv: 2000 rows" in done.stdout
    finally:
        remove_runner_images(docker_client)
