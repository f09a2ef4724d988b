"""The images Docker tasks run in: allowlist, pull policy, preloading, requirements images,
and pruning what this worker pulled or built, least recently used first."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import io
import json
import logging
import tarfile
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Protocol

import docker
import docker.errors
import requests.exceptions
from docker.models.containers import Container

from hivemind_worker.engine.executors.base import ExecutorError
from hivemind_worker.errors import ErrorKind
from hivemind_worker.tasks import TaskKind, TaskSpec, TaskSpecError


class RunnerImageBuilder(Protocol):
    """What images and docker.py need of runner_images.RunnerImages (which imports this module)."""

    def image(
        self,
        python_image: str,
        name: str,
        requirements: Sequence[str],
        on_progress: Callable[[str, str], None] | None = None,
    ) -> str: ...

    def python_version(self, python_image: str) -> str: ...


log = logging.getLogger(__name__)

LABEL_REQUIREMENTS = "hivemind.requirements"
REQUIREMENTS_REPOSITORY = "hivemind-python-req"
PULL_POLICIES = ("if-not-present", "always", "never")
PULL_REPORT_INTERVAL = 0.5
IMAGES_FILE = "_images.json"  # in the work folder: images this worker pulled, by last use

DOCKER_ERRORS = (docker.errors.DockerException, requests.exceptions.RequestException)


def docker_reason(exc: BaseException) -> str:
    """The engine's own words for a Docker error, without the HTTP wrapping."""
    if isinstance(exc, docker.errors.APIError) and exc.explanation:
        return str(exc.explanation)
    return str(exc) or type(exc).__name__


def force_remove(container: Container) -> None:
    """Remove a container by force, and count it removed when it is gone already or Docker is
    removing it already: a worker killed mid-removal leaves the daemon finishing the job, and
    the next start's sweep then meets 409 "removal of container ... is already in progress".
    Any other Docker error is raised."""
    try:
        container.remove(force=True, v=True)
    except docker.errors.NotFound:
        pass
    except docker.errors.APIError as exc:
        if not (exc.status_code == 409 and "already in progress" in docker_reason(exc)):
            raise


def normalize_image(image: str) -> str:
    """The full reference Docker uses: 'python:3.12' is 'docker.io/library/python:3.12'."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return image
    return "docker.io/" + (image if sep else "library/" + image)


def image_allowed(image: str, allowlist: Iterable[str]) -> bool:
    """Whether `image` matches a registry prefix or digest of the allowlist (empty: any)."""
    entries = [e.strip() for e in allowlist if e.strip()]
    if not entries:
        return True
    ref = normalize_image(image)
    for entry in entries:
        if entry.startswith("sha256:"):
            if image.endswith("@" + entry):
                return True
            continue
        # A prefix matches at a path boundary ("ghcr.io/org/" or "ghcr.io/org"), or a whole
        # repository with any tag or digest ("docker.io/library/python").
        if entry.endswith("/"):
            if ref.startswith(entry):
                return True
        elif ref == entry or (ref.startswith(entry) and ref[len(entry)] in "/:@"):
            return True
    return False


def requirements_tag(python_image: str, requirements: Iterable[str]) -> str:
    """The tag of the derived image holding these requirements on top of `python_image`."""
    key = hashlib.sha256("\n".join([python_image, *requirements]).encode()).hexdigest()
    return f"{REQUIREMENTS_REPOSITORY}:{key[:16]}"


def parse_allowlist(text: str) -> tuple[str, ...]:
    return tuple(e.strip() for e in text.split(",") if e.strip())


class ImageStore:
    """The images of one DockerExecutor's tasks: which a task may use, getting them under the
    pull policy, and pruning the ones this worker pulled or built past `budget_bytes`.

    A container task's image must match the allowlist (the Python image is the person's own
    choice, so it is not checked); a python task's requirements are installed into a derived
    image built once per hash of the Python image and the requirements
    (`hivemind-python-req:<hash>`), the only step with a network. The images of prepared
    tasks are never pruned. `on_progress(image, bytes done, bytes total)` is told of pulls,
    from the pulling thread.
    """

    def __init__(
        self,
        client: docker.DockerClient,
        work_dir: Path,
        *,
        python_image: str = "python:3.12-slim",
        pull_policy: str = "if-not-present",
        allowlist: Iterable[str] = (),
        budget_bytes: int = 0,
        on_progress: Callable[[str, int, int], None] | None = None,
    ) -> None:
        if pull_policy not in PULL_POLICIES:
            raise ValueError(f"pull policy must be one of {', '.join(PULL_POLICIES)}")
        self._client = client
        self._python_image = python_image
        self.python_image = python_image
        self._pull_policy = pull_policy
        self._allowlist = tuple(allowlist)
        self._preloaded: set[str] = set()
        self._on_progress = on_progress
        self._images: dict[str, str] = {}  # the image each prepared task runs
        # The id each reference had when last looked up or pulled: a warm sandbox made from
        # an older id is not used (warm.py).
        self.image_ids: dict[str, str] = {}
        self._build_locks: dict[str, threading.Lock] = {}
        self._build_locks_lock = threading.Lock()
        self.ledger = _ImageLedger(Path(work_dir) / IMAGES_FILE)
        # Set by the executor when it runs the ml and data runners (runner_images.py).
        self.runner_images: RunnerImageBuilder | None = None
        self._budget = budget_bytes

    def image_for(self, task: TaskSpec) -> str:
        return task.image if task.kind is TaskKind.CONTAINER else self._python_image

    def check(self, task: TaskSpec) -> None:
        """Refuse (TaskSpecError) a task whose image or requirements this worker will not use."""
        for line in task.requirements if task.kind is TaskKind.PYTHON else ():
            if line.lstrip().startswith("-"):
                # -r, -e, --index-url and friends would reach files or servers of their choosing.
                raise TaskSpecError(
                    "requirements",
                    f"{line[:80]!r} is a pip option; only package requirements are allowed",
                )
        image = self.image_for(task)
        # The Python image is the person's own choice; only images a task names are checked.
        if task.kind is TaskKind.CONTAINER and not image_allowed(image, self._allowlist):
            raise TaskSpecError("image", f"{image} is not in this worker's image allowlist")

    async def acquire(
        self, task: TaskSpec, on_environment: Callable[[str, str], None] | None = None
    ) -> None:
        """Make the task's image present (pulled, or built with its requirements or its
        runner's environment) and keep it from pruning until release(); raises ExecutorError
        with the reason it cannot. `on_environment` is told how a runner's image build goes."""
        image = self.image_for(task)
        await asyncio.to_thread(self._ensure_image, image)
        if task.kind is TaskKind.PYTHON and task.environment and self.runner_images is not None:
            image = await asyncio.to_thread(
                self.runner_images.image, image, task.environment, task.requirements,
                on_environment,
            )  # fmt: skip
            await asyncio.to_thread(self.ledger.touch, image)  # pruned like any it built
        elif task.kind is TaskKind.PYTHON and task.requirements:
            image = await asyncio.to_thread(self._requirements_image, task.requirements)
        self._images[task.task_id] = image
        await asyncio.to_thread(self.ledger.touch, image, only_known=True)

    def adopt(self, task_id: str, image: str) -> None:
        """Keep the image of a container left by an earlier run from pruning while it runs."""
        self._images[task_id] = image

    def image_of(self, task: TaskSpec) -> str:
        """The image a prepared task runs in."""
        return self._images.get(task.task_id) or self.image_for(task)

    def release(self, task_id: str) -> None:
        """The task is done with its image; it may be pruned from now on."""
        self._images.pop(task_id, None)

    async def prune_to_budget(self) -> None:
        """prune() to the budget given at construction (nothing when it is 0)."""
        if self._budget > 0:
            await asyncio.to_thread(self.prune, self._budget)

    def ensure(self, image: str) -> None:
        """Blocking: make `image` present under the pull policy, or raise ExecutorError."""
        self._ensure_image(image)

    async def preload(self, images: list[str]) -> None:
        """Pull what the pool names ahead of its tasks, within the allowlist; failures are
        only logged (the task that needs the image reports them)."""
        for image in images:
            if image in self._preloaded:
                continue
            self._preloaded.add(image)
            if not image_allowed(image, self._allowlist):
                log.warning("not preloading %s: the image allowlist does not admit it", image)
                continue
            try:
                await asyncio.to_thread(self._ensure_image, image)
            except ExecutorError as exc:
                log.warning("could not preload %s: %s", image, exc)
            else:
                log.info("image %s is ready for the pool's tasks", image)

    def _ensure_image(self, image: str) -> None:
        """Apply the pull policy; a failed pull fails the task with the registry's message."""
        if self._pull_policy != "always":
            try:
                self.image_ids[image] = str(self._client.images.get(image).id)
                return
            except docker.errors.ImageNotFound:
                if self._pull_policy == "never":
                    raise ExecutorError(
                        f"image {image} is not on this machine and the pull policy is 'never'"
                    ) from None
            except DOCKER_ERRORS as exc:
                raise ExecutorError(f"cannot look up image {image}: {docker_reason(exc)}") from exc
        repository, tag = docker.utils.parse_repository_tag(image)
        log.info("pulling image %s", image)
        layers: dict[str, tuple[int, int]] = {}  # layer id: (bytes done, bytes total)
        reported = 0.0
        try:
            # A reference without a tag would pull every tag of the repository.
            for event in self._client.api.pull(
                repository, tag=tag or "latest", stream=True, decode=True
            ):
                if not isinstance(event, dict):
                    continue
                if event.get("error"):
                    raise _unavailable(image, str(event["error"]))
                detail = event.get("progressDetail") or {}
                if event.get("id") and detail.get("total"):
                    layers[str(event["id"])] = (int(detail.get("current", 0)), int(detail["total"]))
                now = time.monotonic()
                if now - reported >= PULL_REPORT_INTERVAL:
                    reported = now
                    self._report_pull(image, layers, finished=False)
        except DOCKER_ERRORS as exc:
            raise _unavailable(image, docker_reason(exc)) from exc
        self._report_pull(image, layers, finished=True)
        self.ledger.touch(image)
        try:
            self.image_ids[image] = str(self._client.images.get(image).id)
        except DOCKER_ERRORS:
            self.image_ids.pop(image, None)  # unknown: no warm sandbox is taken for it

    def _report_pull(
        self, image: str, layers: dict[str, tuple[int, int]], *, finished: bool
    ) -> None:
        total = sum(t for _, t in layers.values())
        done = total if finished else sum(min(c, t) for c, t in layers.values())
        if finished:
            log.info("pulled image %s (%d MiB)", image, total >> 20)
        sink = self._on_progress
        if sink is None:
            return
        try:
            sink(image, done, total)
        except Exception:
            log.exception("pull progress sink failed for %s", image)

    def _requirements_image(self, requirements: tuple[str, ...]) -> str:
        """The Python image with these requirements installed, built once per requirements hash.

        The build is the only step with a network (Docker's default bridge); pip runs as
        65534:65534 and installs into /opt/hivemind-deps, which is on the image's PYTHONPATH.
        """
        tag = requirements_tag(self._python_image, requirements)
        with self._build_locks_lock:
            lock = self._build_locks.setdefault(tag, threading.Lock())
        with lock:  # one build per tag, however many tasks ask for it at once
            try:
                self._client.images.get(tag)
                return tag
            except docker.errors.ImageNotFound:
                pass
            except DOCKER_ERRORS as exc:
                raise ExecutorError(f"cannot look up image {tag}: {docker_reason(exc)}") from exc
            log.info("building %s for %d requirement(s)", tag, len(requirements))
            last = ""
            try:
                for event in self._client.api.build(
                    fileobj=_requirements_context(self._python_image, requirements),
                    custom_context=True,
                    tag=tag,
                    rm=True,
                    forcerm=True,
                    pull=False,
                    network_mode="bridge",
                    labels={LABEL_REQUIREMENTS: tag.rpartition(":")[2]},
                    decode=True,
                ):
                    if not isinstance(event, dict):
                        continue
                    if event.get("error"):
                        detail = f" ({last})" if last else ""
                        raise ExecutorError(
                            f"installing the requirements failed: {event['error'].strip()}{detail}"
                        )
                    line = str(event.get("stream", "")).strip()
                    if line and not line.startswith(("Step ", "--->", "Removing intermediate")):
                        last = line[-300:]
            except DOCKER_ERRORS as exc:
                raise ExecutorError(
                    f"installing the requirements failed: {docker_reason(exc)}"
                ) from exc
            self.ledger.touch(tag)
            return tag

    def prune(self, budget_bytes: int) -> list[str]:
        """Remove images this worker pulled or built, least recently used first, until they
        take at most `budget_bytes`; images of prepared tasks are kept. Returns the removed."""
        in_use = set(self._images.values())
        sizes: dict[str, int] = {}
        for ref in self.ledger.refs():
            try:
                sizes[ref] = int(self._client.images.get(ref).attrs.get("Size", 0))
            except docker.errors.ImageNotFound:
                self.ledger.forget(ref)
            except DOCKER_ERRORS as exc:
                log.debug("cannot size image %s: %s", ref, exc)
        total = sum(sizes.values())
        removed: list[str] = []
        for ref in self.ledger.refs():  # oldest first
            if total <= budget_bytes:
                break
            if ref in in_use or ref not in sizes:
                continue
            try:
                self._client.images.remove(ref)
            except DOCKER_ERRORS as exc:  # e.g. a container of someone else's uses it
                log.info("cannot prune image %s: %s", ref, docker_reason(exc))
                continue
            log.info("pruned image %s (%d MiB) to stay within the disk cap", ref, sizes[ref] >> 20)
            self.ledger.forget(ref)
            total -= sizes[ref]
            removed.append(ref)
        return removed


class _ImageLedger:
    """Images this worker pulled or built and when each was last used, kept in a JSON file
    so that pruning never touches images the person pulled themselves."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, float]:
        try:
            data = json.loads(self._path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict):
            return {}
        return {str(k): float(v) for k, v in data.items() if isinstance(v, int | float)}

    def _save(self, data: dict[str, float]) -> None:
        self._path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        partial = self._path.with_suffix(".partial")
        partial.write_text(json.dumps(data, sort_keys=True), encoding="utf-8")
        partial.replace(self._path)

    def touch(self, ref: str, *, only_known: bool = False) -> None:
        with self._lock:
            data = self._load()
            if only_known and ref not in data:
                return
            data[ref] = time.time()
            with contextlib.suppress(OSError):  # a lost entry only means no pruning of it
                self._save(data)

    def forget(self, ref: str) -> None:
        with self._lock:
            data = self._load()
            if data.pop(ref, None) is not None:
                with contextlib.suppress(OSError):
                    self._save(data)

    def refs(self) -> list[str]:
        """Known images, least recently used first."""
        with self._lock:
            data = self._load()
        return sorted(data, key=lambda ref: data[ref])


def _requirements_context(python_image: str, requirements: Iterable[str]) -> io.BytesIO:
    """A build context (tar) of a Dockerfile and the requirements file."""
    dockerfile = (
        f"FROM {python_image}\n"
        "USER root\n"
        "RUN mkdir -p /opt/hivemind-deps && chown 65534:65534 /opt/hivemind-deps\n"
        "COPY requirements.txt /opt/hivemind-requirements.txt\n"
        "USER 65534:65534\n"
        "ENV HOME=/tmp PYTHONPATH=/opt/hivemind-deps PATH=/opt/hivemind-deps/bin:$PATH\n"
        "RUN python3 -m pip install --no-cache-dir --disable-pip-version-check "
        "--no-warn-script-location --target /opt/hivemind-deps "
        "-r /opt/hivemind-requirements.txt\n"
    )
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for name, text in (
            ("Dockerfile", dockerfile),
            ("requirements.txt", "".join(f"{line.strip()}\n" for line in requirements)),
        ):
            data = text.encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    return buffer


def _unavailable(image: str, reason: str) -> ExecutorError:
    """A pull that failed: this computer cannot get the image (registry unreachable, refused,
    unknown). Its own kind, so the engine gives the task to another computer and tells the
    person, instead of failing the task."""
    return ExecutorError(
        f"cannot pull image {image}: {reason}",
        kind=ErrorKind.IMAGE_UNAVAILABLE,
        details=reason,
        needs_action=True,  # often this computer's network: worth telling, once
    )
