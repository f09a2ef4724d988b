"""Following a started container from threads: its output to the log sink, its usage from
the stats API, its exit, without blocking the engine's loop; and the blocking calls on one
container that tolerate its being gone already (kill, pause, remove, state)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import docker.errors
from docker.models.containers import Container

from hivemind_worker.engine.executors.base import LogSink, PausableRun, Usage
from hivemind_worker.engine.executors.images import DOCKER_ERRORS, docker_reason, force_remove
from hivemind_worker.tasks import TaskSpec

log = logging.getLogger(__name__)

T = TypeVar("T")

SAMPLE_INTERVAL = 1.0
FIRST_SAMPLE = 0.25  # seconds after the start
# Output waiting for the engine loop; beyond this the oldest is dropped, so a task printing
# faster than the log sink consumes cannot grow the worker.
PENDING_OUTPUT_CAP = 256 * 1024


@dataclass(eq=False)
class ContainerRun(PausableRun):
    """A started container being followed; threads and the loop share it."""

    task: TaskSpec
    container: Container
    started: float  # time.monotonic()
    paused_at: float | None = None
    paused_total: float = 0.0
    cancelled: bool = False
    timed_out: bool = False
    exited: bool = False
    closed: bool = False  # the run has returned; output threads stop
    lock: threading.Lock = field(default_factory=threading.Lock)
    stop: threading.Event = field(default_factory=threading.Event)
    logs_done: threading.Event = field(default_factory=threading.Event)
    # The followed output reached its end (the container's exit), unbroken: with less than
    # the log file's cap written, `tail` is then the whole end and no final read is needed.
    logs_complete: bool = False
    exit_code: int | None = None  # from the wait, once the container has exited
    usage: Usage = field(default_factory=Usage)
    cpu_seconds: float = 0.0
    max_memory: int = 0
    tail: bytearray = field(default_factory=bytearray)
    output_bytes: int = 0
    pending: bytearray = field(default_factory=bytearray)
    dropped: int = 0
    flush_scheduled: bool = False
    # The disk request: the read-only root leaves the bind-mounted workspace as the one
    # writable place on disk (/tmp is a size-capped tmpfs, counted as memory), so it is the
    # one watched. --storage-opt size= would cap nothing more, and works only on overlay2
    # over xfs with project quotas.
    workspace: Path | None = None
    disk_limit: int = 0  # bytes; 0: not watched
    disk_exceeded: bool = False
    disk_checked_at: float = 0.0
    disk_walk_seconds: float = 0.0


def read_logs(
    run: ContainerRun, loop: asyncio.AbstractEventLoop, on_log: LogSink | None, cap: int
) -> None:
    """Follow the container's output (in a thread): keep the last `cap` bytes, hand chunks
    to the loop."""
    try:
        stream: Iterator[bytes] = run.container.logs(stream=True, follow=True)
        for chunk in stream:
            if run.closed:
                break  # the result is out; what still trickles in has no reader
            with run.lock:
                run.output_bytes += len(chunk)
                # Only the tail is kept: a task printing gigabytes must not grow the worker.
                run.tail += chunk
                if len(run.tail) > cap:
                    del run.tail[: len(run.tail) - cap]
                if on_log is None:
                    continue
                run.pending += chunk
                if len(run.pending) > PENDING_OUTPUT_CAP:
                    extra = len(run.pending) - PENDING_OUTPUT_CAP
                    run.dropped += extra
                    del run.pending[:extra]
                if run.flush_scheduled:
                    continue
                run.flush_scheduled = True
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody listens
                loop.call_soon_threadsafe(flush, run, on_log)
        else:
            run.logs_complete = True
    except Exception as exc:  # the engine went away, the socket broke: the run goes on
        log.debug("output of task %s ended: %s", run.task.task_id, exc)
    finally:
        run.logs_done.set()


def flush(run: ContainerRun, on_log: LogSink | None) -> None:
    """Hand the output gathered so far to the log sink (on the loop)."""
    with run.lock:
        data, dropped = bytes(run.pending), run.dropped
        run.pending.clear()
        run.dropped = 0
        run.flush_scheduled = False
    if on_log is None or not (data or dropped):
        return
    if dropped:
        data = f"\n[... {dropped} bytes of output skipped ...]\n".encode() + data
    try:
        on_log(run.task.task_id, data)
    except Exception:
        log.exception("log sink failed for task %s", run.task.task_id)


def sample_stats(run: ContainerRun) -> None:
    """Sample CPU and memory once a second (in a thread) until the run ends.

    The first sample comes a little after the start, not with it: a sample of a container
    that has only just started says nothing, and the stats call would compete with the
    start itself in the engine.
    """
    previous: tuple[float, float] | None = None  # (monotonic, cpu seconds)
    if run.stop.wait(FIRST_SAMPLE):
        return
    while not run.stop.is_set():
        try:
            stats = run.container.stats(stream=False, one_shot=True)
        except docker.errors.NotFound:
            return
        except Exception as exc:  # a missed sample is only a gap in the usage figures
            log.debug("stats of task %s: %s", run.task.task_id, exc)
            stats = None
        if stats is not None and stats.get("cpu_stats"):
            now = time.monotonic()
            cpu = stats["cpu_stats"].get("cpu_usage", {}).get("total_usage", 0) / 1e9
            memory_stats = stats.get("memory_stats") or {}
            inner = memory_stats.get("stats") or {}
            # v1 counts page cache in usage ("cache"), v2 as "inactive_file".
            memory = int(memory_stats.get("usage", 0)) - int(
                inner.get("cache", inner.get("inactive_file", 0))
            )
            memory = max(memory, 0)
            percent = 0.0
            if previous is not None and now > previous[0]:
                percent = max(cpu - previous[1], 0.0) / (now - previous[0]) * 100
            if cpu > 0 or previous is None:
                previous = (now, cpu)
            run.cpu_seconds = max(run.cpu_seconds, cpu)
            run.max_memory = max(run.max_memory, memory, int(memory_stats.get("max_usage", 0)))
            networks = (stats.get("networks") or {}).values()  # absent on network none
            run.usage = Usage(
                cpu_percent=percent,
                memory_bytes=memory,
                cpu_seconds=run.cpu_seconds,
                network_rx_bytes=sum(int(n.get("rx_bytes", 0)) for n in networks),
                network_tx_bytes=sum(int(n.get("tx_bytes", 0)) for n in networks),
            )
        run.stop.wait(SAMPLE_INTERVAL)


def log_tail(container: Container, cap: int) -> bytes | None:
    """The last `cap` bytes of a stopped container's output, read as a stream."""
    tail = bytearray()
    try:
        for chunk in container.logs(stream=True, follow=False):
            tail += chunk
            if len(tail) > 2 * cap:
                del tail[: len(tail) - cap]
    except DOCKER_ERRORS as exc:
        log.debug("cannot read the output of %s: %s", container.short_id, exc)
        return None
    return bytes(tail[-cap:]) if cap else b""


def start_thread(target: Callable[..., None], name: str, *args: object) -> threading.Thread:
    # Daemon threads: a stuck Docker stream must never keep the worker from exiting.
    thread = threading.Thread(target=target, args=args, name=name, daemon=True)
    thread.start()
    return thread


def in_thread(loop: asyncio.AbstractEventLoop, fn: Callable[[], T], name: str) -> asyncio.Future[T]:
    """Run a long blocking call in its own thread (not the loop's small default pool)."""
    future: asyncio.Future[T] = loop.create_future()

    def settle(value: T | None, error: BaseException | None) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(value)  # type: ignore[arg-type]

    def target() -> None:
        try:
            value = fn()
        except BaseException as exc:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(settle, None, exc)
            return
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(settle, value, None)

    start_thread(target, name)
    return future


# ---------------------------------------------------------------- one container's calls


def signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:
        return str(number)


def container_state(container: Container) -> dict[str, Any]:
    container.reload()
    state: dict[str, Any] = container.attrs.get("State", {})
    return state


def docker_time(text: str) -> float:
    """Seconds since the epoch of a time the engine reports in UTC
    ('2026-11-30T21:58:03.123456789Z'); 0.0 for Go's zero time or anything else."""
    if not text.endswith("Z") or text.startswith("0001-"):
        return 0.0
    head, _, fraction = text[:-1].partition(".")
    try:
        stamp = datetime.strptime(head, "%Y-%m-%dT%H:%M:%S").replace(tzinfo=UTC).timestamp()
        return stamp + (float(f"0.{fraction}") if fraction else 0.0)
    except ValueError:
        return 0.0


def kill_container(container: Container) -> None:
    """SIGKILL the container; a frozen one is thawed so that the kill lands at once."""
    with contextlib.suppress(*DOCKER_ERRORS):
        container.kill()
    with contextlib.suppress(*DOCKER_ERRORS):
        container.unpause()


def pause_container(container: Container) -> None:
    with contextlib.suppress(*DOCKER_ERRORS):  # it may have exited meanwhile
        container.pause()


def unpause_container(container: Container) -> None:
    with contextlib.suppress(*DOCKER_ERRORS):
        container.unpause()


def remove_container(container: Container) -> None:
    try:
        force_remove(container)
    except DOCKER_ERRORS as exc:
        log.warning("cannot remove container %s: %s", container.short_id, docker_reason(exc))
