"""Images for the ml and data runners under Docker: the Python image plus the runner's
environment, copied in.

The environment is the same pinned requirement set the process sandbox uses, built on this
machine by uv as a `--target` folder for the image's Python version and Linux (wheels only,
nothing of them runs here), then copied into a derived image
(`hivemind-runner-<environment>:<hash>`) with a Dockerfile of COPY and ENV only: the build
runs nothing and has no network. Tasks run in that image as in any other, with only their
workspace mounted; the environment is part of the image's read-only root.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import platform
import tarfile
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import docker
import docker.errors

from hivemind_worker.engine.executors.base import ExecutorError
from hivemind_worker.engine.executors.images import DOCKER_ERRORS, docker_reason
from hivemind_worker.engine.runners.environments import Environments

log = logging.getLogger(__name__)

LABEL_RUNNER = "hivemind.runner"
ENV_DIR = "/opt/hivemind-env"
# What the runners import from the standard library: a python3-minimal image lacks these.
PROBE = (
    "import sys, json, decimal, ctypes, sqlite3, bz2, lzma, uuid\n"
    "print('%d.%d' % sys.version_info[:2])\n"
)
Progress = Callable[[str, str], None]


def linux_platform() -> str:
    """uv's name for the Linux the images run: this machine's architecture, glibc 2.28 or
    newer (Debian 10+, every python:*-slim image)."""
    machine = platform.machine().lower()
    arch = {"amd64": "x86_64", "x64": "x86_64", "arm64": "aarch64"}.get(machine, machine)
    return f"{arch}-manylinux_2_28"


class RunnerImages:
    """Derived images per (Python image, environment), built once, on demand; thread-safe."""

    def __init__(self, client: docker.DockerClient, environments: Environments) -> None:
        self._client = client
        self._environments = environments
        self._versions: dict[str, str] = {}  # image id -> its Python's "major.minor"
        self._locks: dict[str, threading.Lock] = {}
        self._guard = threading.Lock()

    def image(
        self,
        python_image: str,
        name: str,
        requirements: Sequence[str],
        on_progress: Progress | None = None,
    ) -> str:
        """The tag of `python_image` with environment `name` in it (blocking; builds it the
        first time). Raises ExecutorError saying what to do when it cannot."""

        def say(line: str) -> None:
            log.info("runner image %s: %s", name, line)
            if on_progress is not None:
                try:
                    on_progress(name, line)
                except Exception:
                    log.exception("environment progress callback failed")

        try:
            base_id = str(self._client.images.get(python_image).id)
        except DOCKER_ERRORS as exc:
            raise ExecutorError(
                f"cannot look up image {python_image}: {docker_reason(exc)}"
            ) from exc
        key = hashlib.sha256("\n".join([base_id, *requirements]).encode()).hexdigest()[:16]
        tag = f"hivemind-runner-{name}:{key}"
        with self._guard:
            lock = self._locks.setdefault(tag, threading.Lock())
        with lock:
            try:
                self._client.images.get(tag)
                return tag
            except docker.errors.ImageNotFound:
                pass
            except DOCKER_ERRORS as exc:
                raise ExecutorError(f"cannot look up image {tag}: {docker_reason(exc)}") from exc
            version = self.python_version(python_image)
            folder = self._environments.target_dir(
                name, requirements, version, on_progress, python_platform=linux_platform()
            )
            started = time.monotonic()
            say(f"copying the {name} environment into an image on {python_image}")
            self._build(python_image, folder, tag, name)
            say(f"image {tag} is ready ({time.monotonic() - started:.0f} s)")
            return tag

    def python_version(self, python_image: str) -> str:
        """The image's Python as "major.minor", checked to have what the runners import
        (blocking); raises ExecutorError saying what to do when it lacks it."""
        try:
            base_id = str(self._client.images.get(python_image).id)
        except DOCKER_ERRORS as exc:
            reason = docker_reason(exc)
            raise ExecutorError(f"cannot look up image {python_image}: {reason}") from exc
        if base_id in self._versions:
            return self._versions[base_id]
        try:
            out = self._client.containers.run(
                python_image, ["python3", "-c", PROBE], entrypoint=[], network_mode="none",
                remove=True, user="65534:65534", cap_drop=["ALL"],
                security_opt=["no-new-privileges"], mem_limit="256m", stderr=True,
            )  # fmt: skip
        except docker.errors.ContainerError as exc:
            raise ExecutorError(
                f"the Python in {python_image} lacks the standard library the ml and data "
                "runners need (json, ctypes, decimal, ...): set docker_python_image to a full "
                "Python image such as python:3.12-slim",
                details=str(exc)[-500:],
            ) from exc
        except DOCKER_ERRORS as exc:
            raise ExecutorError(f"cannot start {python_image}: {docker_reason(exc)}") from exc
        version = bytes(out).decode(errors="replace").strip().splitlines()[-1:]
        if not version or not version[0].replace(".", "").isdigit():
            raise ExecutorError(f"cannot tell the Python version of {python_image}: {out!r}")
        self._versions[base_id] = version[0]
        return version[0]

    def _build(self, python_image: str, folder: Path, tag: str, name: str) -> None:
        dockerfile = (
            f"FROM {python_image}\nCOPY env {ENV_DIR}\nENV PYTHONPATH={ENV_DIR}\n"
        ).encode()
        # The context (hundreds of MB) goes through a file beside the environments, not memory.
        with tempfile.TemporaryFile(dir=self._environments.root) as context:
            with tarfile.open(fileobj=context, mode="w") as tar:
                info = tarfile.TarInfo("Dockerfile")
                info.size = len(dockerfile)
                tar.addfile(info, io.BytesIO(dockerfile))
                tar.add(folder, arcname="env", filter=_root_owned_read_only)
            context.seek(0)
            try:
                for event in self._client.api.build(
                    fileobj=context, custom_context=True, tag=tag, rm=True, forcerm=True,
                    pull=False, network_mode="none", labels={LABEL_RUNNER: name}, decode=True,
                ):  # fmt: skip
                    if isinstance(event, dict) and event.get("error"):
                        raise ExecutorError(
                            f"building the {name} runner image failed: {event['error'].strip()}"
                        )
            except DOCKER_ERRORS as exc:
                raise ExecutorError(
                    f"building the {name} runner image failed: {docker_reason(exc)}"
                ) from exc


def _root_owned_read_only(info: tarfile.TarInfo) -> tarfile.TarInfo | None:
    if info.issym() and os.path.isabs(info.linkname):
        return None  # a link out of the environment would point into the image's own files
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    info.mode &= 0o555
    return info
