"""The engine's session with a pool: connect, register, heartbeat, long-poll for tasks.

A mixin of WorkerEngine (engine.py), kept in its own room; the attributes it uses are
declared below and set by the engine. A session ends by raising: `_SessionOver` when it
ends on purpose (stop, drain done), a `PoolError` when the connection failed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from hivemind_worker import __version__
from hivemind_worker.config import Settings
from hivemind_worker.credentials import CredentialError, CredentialStore
from hivemind_worker.engine import memory, runners
from hivemind_worker.engine.delivery import Delivery
from hivemind_worker.engine.events import EngineState
from hivemind_worker.engine.executors.base import Executor
from hivemind_worker.engine.monitor import HostMonitor, HostSample
from hivemind_worker.engine.pool_client import (
    AuthError,
    NodePoolClient,
    NodeStatus,
    Offer,
    PoolError,
    PoolUnavailable,
    RefusedSpec,
    Registration,
    RunningLease,
)
from hivemind_worker.engine.runs import _Running
from hivemind_worker.errors import ErrorKind
from hivemind_worker.tasks import Resources, TaskSpec, image_reference_ok

log = logging.getLogger("hivemind_worker.engine.engine")

BUSY_POLL_SECONDS = 2
# How long a stop waits, still connected, for its cancelled tasks to end and be given back;
# the bound is for a pool that does not answer.
GIVE_BACK_SECONDS = 5.0
# A wait for work that a poke ends (a resume, a task ending, new caps) also ends after this
# long, as a safety net: a condition that changed without a poke costs a minute, not a hang.
RECHECK_SECONDS = 60.0
# The longest heartbeat interval taken from a pool (it slows them as its fleet grows).
MAX_HEARTBEAT_INTERVAL = 3600.0


class Session:
    """One connection's work (mixed into WorkerEngine)."""

    settings: Settings
    node_id: str
    credentials: CredentialStore
    if TYPE_CHECKING:

        @property
        def executor(self) -> Executor: ...  # WorkerEngine's, chosen when run() starts

    delivery: Delivery
    monitor: HostMonitor
    _client: NodePoolClient | None
    _client_factory: Callable[..., NodePoolClient]
    _connected: asyncio.Event | None
    _running: dict[str, _Running]
    _paused: bool
    _draining: bool
    _want_running: bool
    _shutdown: bool
    _shutdown_after_drain: bool
    _attempt: int
    _heartbeat_interval: float
    _lease_timeout: float
    _max_wait: int
    _poll_call: asyncio.Future[list[TaskSpec | RefusedSpec]] | None

    if TYPE_CHECKING:  # provided by WorkerEngine or the other mixin; declared for mypy only

        def _set_state(
            self,
            state: EngineState,
            message: str = "",
            retry_at: float | None = None,
            error_kind: ErrorKind | None = None,
            details: str = "",
        ) -> None: ...

        def _refresh_state(self) -> None: ...

        def _spawn(self, coro: Awaitable[object], what: str) -> None: ...

        async def _wait_changed(self, timeout: float | None = None) -> None: ...

        def _poke(self) -> None: ...

        async def _heartbeat_sample(self) -> HostSample: ...

        def _caps(self) -> Resources: ...

        def _in_use(self) -> Resources: ...

        def _do_drain(self) -> None: ...

        def _take(self, offered: list[TaskSpec | RefusedSpec], *, asked: int) -> None: ...

        def _held(self) -> bool: ...

        def _status_message(self) -> str: ...

    async def _session(self) -> None:
        """Connect, register and work until the connection fails or we stop contributing."""
        self._set_state(EngineState.CONNECTING, f"connecting to {self.settings.node_pool_address}")
        address = self.settings.node_pool_address
        last: str | None = await asyncio.to_thread(self.credentials.last_account, address)
        account = self.settings.account or last or ""
        try:
            token = (
                await asyncio.to_thread(self.credentials.get_token, address, account)
                if account
                else None
            )
        except CredentialError as exc:
            raise AuthError(
                "Keyring unavailable", exc.message, details=exc.details, kind=ErrorKind.KEYRING
            ) from None
        if not token:
            raise AuthError("Not logged in", f"You are not signed in to the pool at {address}.")
        client = self._client_factory(self.settings, token=token)
        self._client = client
        try:
            try:
                await self._register(client)
            except asyncio.CancelledError:
                # apply_settings closed the channel under this call (a new pool address);
                # grpc.aio reports that as CancelledError although this task was not cancelled.
                current = asyncio.current_task()
                if current is None or current.cancelling():
                    raise
                raise PoolUnavailable("Reconnecting", "settings changed") from None
            self._attempt = 0
            assert self._connected is not None
            self._connected.set()
            self._poke()  # deliveries waiting for a connection (_wait_connected)
            self._refresh_state()
            async with asyncio.TaskGroup() as group:
                group.create_task(self._heartbeat_loop(client), name="heartbeat")
                group.create_task(self._poll_loop(client), name="poll")
                group.create_task(self._watch_stop(), name="watch-stop")
        except BaseExceptionGroup as group_exc:
            first = _first_leaf(group_exc)
            if isinstance(first, PoolError):
                raise first from None
            if not isinstance(first, Exception):
                raise
            # A bug or an odd library error must not end the engine: log it, reconnect.
            log.error("session failed", exc_info=first)
            raise PoolError(
                "Internal error",
                "Something went wrong in the worker; it reconnects.",
                details=f"{type(first).__name__}: {first}",
                kind=ErrorKind.INTERNAL,
            ) from first
        finally:
            if self._connected is not None:
                self._connected.clear()
            if self._client is client:
                self._client = None
            await client.close()

    def _capabilities(self) -> tuple[str, ...]:
        """The executor's capability, and those of the runners the settings enable."""
        if not self.executor.runs_runners:
            return (self.executor.capability,)
        return (self.executor.capability, *runners.enabled_capabilities(self.settings))

    async def _register(self, client: NodePoolClient) -> None:
        info = await asyncio.to_thread(self.monitor.info)
        terms = await client.register(
            Registration(
                node_id=self.node_id,
                hostname=info.hostname,
                cpu_cores=info.cpu_cores,
                memory_bytes=info.memory_bytes,
                disk_bytes=info.disk_bytes,
                capabilities=self._capabilities(),
                agent_version=__version__,
                platform=info.platform,
                caps=self._caps(),
                max_concurrent_tasks=self.settings.max_concurrent_tasks,
            )
        )
        self._take_pace(terms.heartbeat_interval, terms.lease_timeout)
        if terms.max_wait:
            self._max_wait = terms.max_wait
        if terms.preload_images:
            # Validated like a task's image before anything is fetched.
            images = [i for i in terms.preload_images if image_reference_ok(i)][:32]
            self._spawn(self.executor.preload(images), "preload images")
        if not self._running:  # start-up's garbage (imports, settings, login) goes back
            self._spawn(asyncio.to_thread(memory.trim), "trim memory")
        log.info(
            "registered node %s with %s (heartbeat every %.0f s)",
            self.node_id,
            client.address,
            self._heartbeat_interval,
        )

    async def _watch_stop(self) -> None:
        """Ends the session when the person stops contributing, or when draining is done.

        Woken by pokes only: each condition below changes with one (a command, a task's
        end, a reconnect asked for by apply_settings)."""
        while True:
            if self._shutdown or not self._want_running:
                # Stopped tasks report CANCELLED (given back) while we are still connected;
                # a bounded wait, so an unresponsive pool cannot hold up the stop.
                deadline = time.monotonic() + GIVE_BACK_SECONDS
                while self._running and time.monotonic() < deadline:
                    await self._wait_changed(deadline - time.monotonic())
                break
            if self._draining and not self._running:  # finished and delivered
                log.info("drained: no task left running")
                self._want_running = False
                self._draining = False
                if self._shutdown_after_drain:
                    self._shutdown = True
                break
            if self._client is None:  # apply_settings asked for a reconnect
                raise PoolUnavailable("Reconnecting", "settings changed")
            await self._wait_changed()
        raise _SessionOver()

    async def _heartbeat_loop(self, client: NodePoolClient) -> None:
        while True:
            await self._send_heartbeat(client)
            await asyncio.sleep(self._heartbeat_interval)

    async def _send_heartbeat(self, client: NodePoolClient) -> None:
        usage = self.executor.usage()
        running = [
            RunningLease(r.spec.task_id, r.spec.lease_id, usage.get(r.spec.task_id))
            for r in self._running.values()
        ]
        running += [
            RunningLease(task_id, lease_id)
            for task_id, lease_id in self.delivery.undelivered
            if task_id not in self._running
        ]
        status = (
            NodeStatus.PAUSED
            if self._held()
            else NodeStatus.DRAINING
            if self._draining
            else NodeStatus.BUSY
            if running
            else NodeStatus.IDLE
        )
        host = await self._heartbeat_sample()
        reply = await client.heartbeat(self.node_id, status, host, running, self._status_message())
        for task_id in reply.cancel_task_ids:
            if task_id in self._running and not self._running[task_id].finished:
                log.info("pool cancelled task %s", task_id)
                await self.executor.cancel(task_id)
        lost = set(reply.lost_lease_ids)
        for run in list(self._running.values()):
            if run.spec.lease_id in lost and not run.finished:
                log.warning("pool no longer honours lease %s; stopping task", run.spec.lease_id)
                await self.executor.cancel(run.spec.task_id)
        if reply.drain and not self._draining:
            log.info("pool asked this node to drain")
            self._do_drain()
        if reply.heartbeat_interval and reply.heartbeat_interval != self._heartbeat_interval:
            log.info(
                "the pool asks for a heartbeat every %.0f s (was %.0f s)",
                reply.heartbeat_interval,
                self._heartbeat_interval,
            )
        self._take_pace(reply.heartbeat_interval, reply.lease_timeout)

    def _take_pace(self, heartbeat_interval: float | None, lease_timeout: float | None) -> None:
        """The pool's pace (None: unchanged). A pool slows heartbeats as its fleet grows; at
        most one an hour, so a pool's mistake cannot stop them."""
        if heartbeat_interval:
            self._heartbeat_interval = min(heartbeat_interval, MAX_HEARTBEAT_INTERVAL)
        if lease_timeout:
            self._lease_timeout = lease_timeout

    async def _poll_loop(self, client: NodePoolClient) -> None:
        while True:
            if self._held() or self._draining or not self._want_running:
                await self._wait_changed(RECHECK_SECONDS)
                continue
            active = sum(1 for r in self._running.values() if not r.finished)
            slots = self.settings.max_concurrent_tasks - active
            free = (self._caps() - self._in_use()).clamp_at_zero()
            if slots <= 0 or free.cpus <= 0 or free.memory_bytes <= 0:
                await self._wait_changed(RECHECK_SECONDS)
                continue
            if await self.delivery.is_full():
                log.warning("the result spool is full; taking no task until results drain")
                await self._wait_changed(30.0)
                continue
            offer = Offer(
                free=free,
                max_tasks=slots,
                # The offer carries the free capacity of this moment; while tasks run, it
                # grows as they end, so the call is renewed every couple of seconds.
                # (Withdrawing the call instead could drop a lease the pool has just handed
                # out, lost until it expires.)
                wait_seconds=self._max_wait if not active else BUSY_POLL_SECONDS,
                capabilities=self._capabilities(),
                max_timeout_seconds=self.settings.task_timeout,
                networks=tuple(sorted({"none", self.settings.docker_network})),
            )
            call = asyncio.ensure_future(client.get_tasks(self.node_id, offer))
            self._poll_call = call
            # Withdrawn or abandoned at a reconnect, its PoolUnavailable must still be read,
            # or asyncio logs "Task exception was never retrieved".
            call.add_done_callback(lambda f: f.cancelled() or f.exception())
            try:
                await asyncio.wait({call})
            finally:
                if not call.done():  # this loop itself was cancelled
                    call.cancel()
                self._poll_call = None
            if call.cancelled():  # withdrawn by pause, drain or stop
                continue
            self._take(call.result(), asked=slots)

    # ------------------------------------------------------------------ tasks


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in a (possibly nested) exception group that is not _SessionOver.

    A session ending on purpose raises _SessionOver in one task while the others are
    cancelled; any real error beside it is the one to report. Only _SessionOver: itself.
    """
    leaves: list[BaseException] = []

    def walk(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                walk(inner)
        else:
            leaves.append(exc)

    walk(group)
    for leaf in leaves:
        if not isinstance(leaf, _SessionOver):
            return leaf
    return leaves[0]


class _SessionOver(PoolError):
    """The session ended on purpose (stop, drain finished, shutdown)."""

    def __init__(self) -> None:
        super().__init__("Stopped", "The session is over.")
