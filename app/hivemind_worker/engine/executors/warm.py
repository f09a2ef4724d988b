"""Warm sandboxes: started, locked-down containers waiting for their python task.

Creating and starting a container is most of what a short task costs under Docker (the
runtime sets up namespaces, cgroups and mounts). A warm sandbox has that done before its task
arrives: a container made with the executor's own configuration (DockerExecutor.warm_config,
the same lock-down as every task's container) for the resources, image and network of the
task before it, whose first process is a small waiter. The waiter makes a named pipe in the
sandbox's empty workspace and blocks reading it (no CPU, a few MiB of memory). Taking a task
is writing its inputs into that workspace and its command and environment into the pipe:
the waiter removes the pipe and replaces itself with the task's program, which from then on
is the container's main process, followed like any other (wait, output, usage, exit).

Each sandbox runs one task: afterwards its container is removed with its workspace, and a
fresh one (a new container, an empty workspace) is made for the next task. Python tasks
only: their image has the Python the waiter needs, and a container task's image may have no
program to wait with. The waiter needs a named pipe shared through the workspace's bind
mount; where the engine cannot offer one (Docker Desktop's file sharing), the first sandbox
never gets ready and the pool turns itself off, with the reason in the log.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import docker
import docker.errors
from docker.models.containers import Container

from hivemind_worker.engine.executors.images import DOCKER_ERRORS, docker_reason, force_remove
from hivemind_worker.engine.executors.workspace import rmtree
from hivemind_worker.tasks import Resources

log = logging.getLogger(__name__)

START_PIPE = ".hivemind-start"
READY_TIMEOUT = 30.0  # for the waiter's pipe to appear after the container's start
LAUNCH_TIMEOUT = 2.0  # for the waiter to be reading its pipe when the task comes
POLL_SECONDS = 0.005

# The container's first process until its task comes (python3 -I -S -c WAITER, in the
# workspace). The message is `<argc>\0<argv...>\0<KEY=value...>`, NUL-separated (neither an
# argument nor the environment can hold a NUL); python3-minimal images have no json.
WAITER = f"""\
import os
os.mkfifo({START_PIPE!r}, 0o600)
fd = os.open({START_PIPE!r}, os.O_RDONLY)
data = b""
while True:
    chunk = os.read(fd, 65536)
    if not chunk:
        break
    data += chunk
os.close(fd)
os.unlink({START_PIPE!r})
fields = data.split(b"\\0")
if len(fields) < 2:
    raise SystemExit(3)
argc = int(fields[0])
env = {{k: v for k, v in os.environb.items() if not k.startswith(b"HIVEMIND_")}}
for pair in fields[1 + argc:]:
    key, _, value = pair.partition(b"=")
    env[key] = value
os.execvpe(fields[1], fields[1:1 + argc], env)
"""
WAITER_COMMAND = ["python3", "-I", "-S", "-c", WAITER]


class WarmError(Exception):
    """A warm sandbox cannot take its task (its waiter is gone): start a new container."""


@dataclass(frozen=True)
class Shape:
    """What a container is made with before its task is known; a task runs in a warm sandbox
    only of its own shape."""

    image: str
    image_id: str  # the image the reference named when the sandbox was made
    resources: Resources
    network: str


@dataclass(eq=False)
class Slot:
    name: str
    shape: Shape
    workspace: Path
    container: Container | None = None
    dropped: bool = False
    ready: asyncio.Task[bool] | None = field(default=None, repr=False)


MakeConfig = Callable[[Shape, Path, str], dict[str, Any]]


class WarmPool:
    """The warm sandboxes of one DockerExecutor, on the engine's loop (Docker calls in threads).

    `config(shape, workspace, slot)` gives the containers.create() arguments (the executor's
    lock-down); `own(path)` hands a new workspace to the task user.
    """

    def __init__(
        self,
        client: docker.DockerClient,
        root: Path,
        config: MakeConfig,
        own: Callable[[Path], None],
    ) -> None:
        self._client = client
        self._root = root
        self._config = config
        self._own = own
        self._slots: list[Slot] = []
        self._making: set[asyncio.Future[Any]] = set()
        self.broken = ""  # why warm sandboxes are off on this machine; "" while they work
        self.taken = 0  # tasks that started in a warm sandbox (for the benchmark and tests)

    def __len__(self) -> int:
        return len(self._slots)

    def containers(self) -> list[Container]:
        return [s.container for s in self._slots if s.container is not None]

    # ---------------------------------------------------------------- taking

    async def take(self, shape: Shape) -> Slot | None:
        """A ready sandbox of this shape, now the caller's; None when there is none (one
        still being made is waited for: it is ready sooner than a new container)."""
        for stale in [s for s in self._slots if s.shape.image == shape.image != "" and
                      s.shape.image_id != shape.image_id]:  # fmt: skip
            self._slots.remove(stale)  # made from what the image was before a pull or build
            self._drop(stale)
        slot = next((s for s in self._slots if s.shape == shape and not s.dropped), None)
        if slot is None or slot.ready is None:
            return None
        self._slots.remove(slot)
        if not await asyncio.shield(slot.ready):
            return None
        self.taken += 1
        return slot

    def launch(self, slot: Slot, argv: list[str], env: dict[str, str]) -> None:
        """Blocking: hand the task's command and environment to the slot's waiter, which
        becomes the task. Raises WarmError when the waiter does not take it."""
        args = [a.encode() for a in argv]
        pairs = [f"{k}={v}".encode() for k, v in env.items()]
        if not args or any(b"\0" in item for item in (*args, *pairs)):
            raise WarmError("the command or environment holds a NUL byte")
        message = b"\0".join([str(len(args)).encode(), *args, *pairs])
        pipe = slot.workspace / START_PIPE
        deadline = time.monotonic() + LAUNCH_TIMEOUT
        while True:
            try:
                # Non-blocking: fails at once (ENXIO) unless the waiter has it open to read.
                fd = os.open(pipe, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
                break
            except OSError as exc:
                if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                    raise WarmError(f"the sandbox's waiter is gone ({exc.strerror})") from exc
                time.sleep(POLL_SECONDS)
        try:
            if not stat.S_ISFIFO(os.fstat(fd).st_mode):
                raise WarmError("the sandbox's start pipe is not a pipe")
            os.set_blocking(fd, True)
            view = memoryview(message)
            while view:
                view = view[os.write(fd, view) :]
        except OSError as exc:
            raise WarmError(f"cannot start the task in its sandbox: {exc.strerror}") from exc
        finally:
            os.close(fd)

    # ---------------------------------------------------------------- making

    def fill(self, shape: Shape, room: int) -> None:
        """Make a sandbox of this shape if fewer than `room` are kept (the oldest of another
        shape makes way); returns at once, the sandbox is made in the background."""
        if self.broken or room <= 0:
            return
        while len(self._slots) >= room:
            other = next((s for s in self._slots if s.shape != shape), None)
            if other is None:
                return
            self._slots.remove(other)
            self._drop(other)
        name = f"warm-{uuid.uuid4().hex[:16]}"
        slot = Slot(name, shape, self._root / name)
        slot.ready = asyncio.create_task(self._make(slot), name=f"make-{name}")
        self._making.add(slot.ready)
        slot.ready.add_done_callback(self._making.discard)
        self._slots.append(slot)

    async def _make(self, slot: Slot) -> bool:
        try:
            await asyncio.to_thread(self._make_sync, slot)
        except Exception as exc:
            reason = docker_reason(exc) if isinstance(exc, DOCKER_ERRORS) else str(exc)
            if not slot.dropped:
                # The first failure turns the pool off: it would fail the same way again.
                self.broken = reason
                log.warning("warm sandboxes are off: %s; tasks start in new containers", reason)
            slot.dropped = True
        if slot.dropped:
            with contextlib.suppress(ValueError):
                self._slots.remove(slot)
            await asyncio.to_thread(self.remove, slot)
            return False
        return True

    def _make_sync(self, slot: Slot) -> None:
        self._root.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.mkdir(slot.workspace, 0o700)
        self._own(slot.workspace)
        slot.container = self._client.containers.create(
            **self._config(slot.shape, slot.workspace, slot.name)
        )
        if slot.dropped:
            return
        slot.container.start()
        pipe = slot.workspace / START_PIPE
        deadline = time.monotonic() + READY_TIMEOUT
        checked = time.monotonic()
        while not slot.dropped:
            with contextlib.suppress(FileNotFoundError):
                if stat.S_ISFIFO(os.lstat(pipe).st_mode):
                    return
                raise RuntimeError("the sandbox's start pipe is not a named pipe here")
            now = time.monotonic()
            if now > deadline:
                raise RuntimeError(f"the sandbox's waiter was not ready in {READY_TIMEOUT:.0f} s")
            if now - checked > 0.5:  # a waiter that died (no named pipes here) ends the wait
                checked = now
                slot.container.reload()
                if slot.container.status != "running":
                    raise RuntimeError(
                        "the sandbox's waiter stopped before it was ready: "
                        + slot.container.logs(tail=3).decode("utf-8", "replace").strip()
                    )
            time.sleep(POLL_SECONDS)

    # ---------------------------------------------------------------- dropping

    def _drop(self, slot: Slot) -> None:
        """Remove a slot no longer in the pool: at once when made, else when its making ends."""
        slot.dropped = True
        if slot.ready is not None and slot.ready.done():
            task = asyncio.ensure_future(asyncio.to_thread(self.remove, slot))
            self._making.add(task)
            task.add_done_callback(self._making.discard)

    async def drop(self) -> None:
        """Remove every warm sandbox (caps, policy or images changed; stopping)."""
        slots, self._slots = self._slots, []
        for slot in slots:
            self._drop(slot)
        await self.settle()

    async def settle(self) -> None:
        """Wait until no sandbox is being made or removed."""
        while self._making:
            await asyncio.gather(*list(self._making), return_exceptions=True)

    def remove(self, slot: Slot) -> None:
        """Blocking: the slot's container and workspace, gone (a taken slot's too)."""
        if slot.container is not None:
            try:
                force_remove(slot.container)
            except DOCKER_ERRORS as exc:
                log.warning("cannot remove the warm sandbox %s: %s", slot.name, exc)
        with contextlib.suppress(FileNotFoundError):
            rmtree(slot.workspace)
