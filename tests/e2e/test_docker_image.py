"""The container image around the built binary: it runs, and reaches the host's engine."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from artefacts import ROOT, run, unavailable

from hivemind_worker import __version__

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.skipif(sys.platform != "linux", reason="a Linux container image"),
]
# The Docker tests' image (build.py test-image): a Debian 12 rootfs, no registry needed.
BASE = "hivemind-test-python:bookworm"
TAG = "hivemind-worker:e2e"
SOCKET = Path("/var/run/docker.sock")


def test_image_runs_the_binary_and_reaches_the_host_engine(
    app_folder: Path, need_tool: Callable[[str], str]
) -> None:
    assert app_folder.is_file(), "the image is built from the one-folder app"
    docker = need_tool("docker")
    if run([docker, "info"]).returncode != 0:
        unavailable("no Docker engine is running")
    if run([docker, "image", "inspect", BASE]).returncode != 0:
        unavailable(f"the base image {BASE} is missing: python3 build.py test-image")
    built = run(
        [docker, "build", "-q", "--build-arg", f"BASE_IMAGE={BASE}", "-t", TAG, ROOT],
        env={**os.environ, "DOCKER_BUILDKIT": "0"},
        timeout=240,
    )
    assert built.returncode == 0, built.stderr
    try:
        version = run([docker, "run", "--rm", TAG, "--version"])
        assert version.stdout.strip() == f"hivemind-worker {__version__}", version.stderr
        # The socket and its group, as the README says: the worker sees the host's engine.
        gid = str(SOCKET.stat().st_gid)
        doctor = run(
            [docker, "run", "--rm", "-v", f"{SOCKET}:{SOCKET}", "--group-add", gid, TAG, "doctor"],
            timeout=120,
        )
        docker_line = [line for line in doctor.stdout.splitlines() if " docker " in line]
        assert docker_line and docker_line[0].startswith("ok"), doctor.stdout + doctor.stderr
    finally:
        run([docker, "image", "rm", "-f", TAG])
