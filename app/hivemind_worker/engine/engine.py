"""WorkerEngine: the Qt-free facade that connects to a pool, takes tasks, runs them and reports."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import sqlite3
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hivemind_worker import __version__
from hivemind_worker.config import Settings
from hivemind_worker.credentials import CredentialError, CredentialStore
from hivemind_worker.engine.events import (
    EngineState,
    ErrorRaised,
    Event,
    EventHub,
    ImagePull,
    MetricsSample,
    PolicyChanged,
    ResultDelivered,
    StateChanged,
    Subscriber,
    TaskFinished,
    TaskOutput,
    TaskStarted,
)
from hivemind_worker.engine.executors.base import Executor, ExecutorError
from hivemind_worker.engine.monitor import HostMonitor
from hivemind_worker.engine.outbox import Outbox, OutboxFull, Pending
from hivemind_worker.engine.policy import (
    Decision,
    Observation,
    Policy,
    PolicySettings,
    Verdict,
)
from hivemind_worker.engine.pool_client import (
    AuthError,
    NodePoolClient,
    NodeUnknownError,
    PoolError,
    PoolUnavailable,
    StaleLeaseError,
    client_for,
    file_sha256,
)
from hivemind_worker.engine.probes import NoProbes, Probes
from hivemind_worker.engine.tasks import (
    Resources,
    TaskResult,
    TaskSpec,
    TaskSpecError,
    TaskStatus,
    image_reference_ok,
)
from hivemind_worker.logs import task_context
from hivemind_worker.protocol import nodepool_pb2 as pb

log = logging.getLogger(__name__)

BACKOFF_INITIAL = 1.0
BACKOFF_MAX = 60.0
AUTH_RETRY_SECONDS = 60.0
METRICS_INTERVAL = 1.0
POLICY_INTERVAL = 1.0
POLICY_SLICES = 4  # cheap input checks between two evaluations (see _input_seen)
BUSY_POLL_SECONDS = 2
GIVE_BACK_SECONDS = 5.0
MAX_UNEXPECTED_DELIVERY_ERRORS = 10
LOG_TAIL_REPORT_BYTES = 16 * 1024


def backoff_delay(
    attempt: int, *, initial: float = BACKOFF_INITIAL, cap: float = BACKOFF_MAX
) -> float:
    """Exponential backoff with jitter: uniform in [initial/2, min(cap, initial * 2**attempt)]."""
    ceiling = min(cap, initial * (2 ** min(attempt, 16)))
    return random.uniform(min(initial / 2, ceiling), ceiling)


@dataclass
class _Running:
    spec: TaskSpec
    started: float
    task: asyncio.Task[None] | None = None
    finished: bool = False  # execution over; the result may still be on its way to the pool
    adopted: bool = False  # left running by an earlier run of this worker; re-attached
    cancel_requested: bool = False  # checked after prepare(), so an early cancel is not lost


class WorkerEngine:
    """Start / pause / resume / drain / stop from any thread; `run()` is the engine's coroutine.

    Commands are thread-safe: they hop onto the engine loop with call_soon_threadsafe, so the
    GUI thread never waits on the engine.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        node_id: str,
        credentials: CredentialStore,
        executor: Executor,
        outbox_dir: Path,
        probes: Probes | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.credentials = credentials
        self.executor = executor
        self.outbox_dir = outbox_dir
        self.monitor = HostMonitor(settings.work_dir)
        self._hub = EventHub()
        self._state = EngineState.STOPPED
        self._state_message = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._want_running = False
        self._paused = False
        self._draining = False
        self._shutdown = False
        self._shutdown_after_drain = False
        self._client: NodePoolClient | None = None
        self._connected: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None  # capacity, commands or settings changed
        self._running: dict[str, _Running] = {}
        self._outbox: Outbox | None = None
        self._undelivered: dict[tuple[str, str], TaskResult] = {}  # spooled, from earlier runs
        self._background: set[asyncio.Future[None]] = set()
        self._heartbeat_interval = float(settings.heartbeat_interval)
        self._lease_timeout = 60.0
        self._max_wait = 30
        self._attempt = 0  # reconnect attempts since the last successful registration
        self._poll_call: asyncio.Task[list[pb.TaskSpec]] | None = None
        executor.on_pull = self._on_pull
        # When to contribute: the probes see, the policy decides, _apply_decision acts.
        # Without probes only the rules that need none (schedule, CPU time) can hold.
        self._probes: Probes = probes or NoProbes()
        self._policy = Policy(PolicySettings.from_settings(settings))
        self._decision: Decision | None = None
        self._last_seen = Observation()
        self._suspended = False  # the policy holds the tasks (a manual pause is _paused)
        self._suspended_at: float | None = None  # monotonic, for the give-back limit
        self._gave_back = False  # this suspension's leases were given back already
        self._frozen = False  # what the executor was last told: paused or not
        self._share_applied: tuple[float, frozenset[str]] = (1.0, frozenset())
        self.tasks_done = 0
        self.tasks_failed = 0

    def _on_pull(self, image: str, done: int, total: int) -> None:
        # Called from the executor's pull thread: the event is published on the engine loop.
        self._call(lambda: self._hub.publish(ImagePull(image, done, total)))

    # ------------------------------------------------------------------ public, any thread

    def subscribe(self, callback: Subscriber) -> Callable[[], None]:
        return self._hub.subscribe(callback)

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def state_message(self) -> str:
        return self._state_message

    def start(self) -> None:
        """Start contributing: connect, register and take tasks."""
        self._call(self._do_start)

    def pause(self) -> None:
        """Freeze running tasks and take no new ones; nothing is lost."""
        self._call(self._do_pause)

    def resume(self) -> None:
        self._call(self._do_resume)

    def drain(self) -> None:
        """Finish running tasks, take no new ones, then stop contributing."""
        self._call(self._do_drain)

    def stop(self) -> None:
        """Stop contributing now: running tasks are killed and go back to the pool."""
        self._call(self._do_stop)

    def cancel_task(self, task_id: str) -> None:
        """Stop one running task; it is reported CANCELLED and the pool hands it out again."""

        def cancel() -> None:
            run = self._running.get(task_id)
            if run is not None and not run.finished and not run.cancel_requested:
                run.cancel_requested = True
                self._spawn(self.executor.cancel(task_id), "cancel")

        self._call(cancel)

    def shutdown(self) -> None:
        """End `run()`; running tasks are stopped."""
        self._call(self._do_shutdown)

    def drain_and_shutdown(self, timeout: float) -> None:
        """Finish running tasks (at most `timeout` seconds), deliver their results, then end."""

        def begin() -> None:
            self._shutdown_after_drain = True
            self._do_drain()
            if not self._running or not self._want_running:
                self._do_shutdown()
            elif self._loop is not None:
                self._loop.call_later(timeout, self._do_shutdown)

        self._call(begin)

    @property
    def decision(self) -> Decision | None:
        """The policy's latest decision; None before the first evaluation."""
        return self._decision

    def contribute_anyway(self, seconds: float) -> None:
        """Run tasks for `seconds` whatever the policy says (0 ends it); a manual pause still
        wins."""

        def override() -> None:
            self._policy.override(time.time() + seconds if seconds > 0 else None)
            # Decided again at once on what the probes saw last (the probes themselves are
            # only ever asked from the policy loop, one call at a time).
            self._apply_decision(self._policy.evaluate(self._last_seen, _now()))

        self._call(override)

    def apply_settings(self, settings: Settings) -> None:
        """New caps and limits apply to new tasks at once; a new pool address reconnects."""
        self._call(lambda: self._do_apply(settings))

    async def run(self, *, autostart: bool = True) -> None:
        """The engine's main coroutine; returns after shutdown()."""
        self._loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._want_running = autostart or self._want_running
        metrics = asyncio.create_task(self._metrics_loop(), name="metrics")
        policy = asyncio.create_task(self._policy_loop(), name="policy")
        leftovers: list[asyncio.Task[None]] = []
        spooled: set[tuple[str, str]] = set()
        if self.executor.notice:
            self._hub.publish(ErrorRaised("Docker not available", self.executor.notice))
        try:
            self._outbox = await asyncio.to_thread(Outbox, self.outbox_dir)
            for pending in await asyncio.to_thread(self._outbox.pending):
                spooled.add((pending.result.task_id, pending.result.lease_id))
                leftovers.append(asyncio.create_task(self._deliver_spooled(pending)))
        except (OSError, sqlite3.Error) as exc:
            log.error("the result spool in %s is unusable: %s", self.outbox_dir, exc)
            self._hub.publish(ErrorRaised("Result spool unusable", str(exc)))
        self._adopt_leftovers(spooled)
        try:
            while not self._shutdown:
                if not self._want_running:
                    self._set_state(EngineState.STOPPED)
                    await self._wait_changed()
                    continue
                try:
                    await self._session()
                except _SessionOver:
                    self._attempt = 0
                except AuthError as exc:
                    # No crash loop: a clear state, and a slow retry that picks up a new login.
                    self._set_state(
                        EngineState.ERROR, exc.message, time.time() + AUTH_RETRY_SECONDS
                    )
                    self._hub.publish(ErrorRaised(exc.title, exc.message))
                    await self._wait_changed(AUTH_RETRY_SECONDS)
                except PoolError as exc:
                    delay = self._reconnect_delay()
                    self._set_state(
                        EngineState.CONNECTING,
                        f"{exc.message}; retrying in {delay:.0f} s",
                        time.time() + delay,
                    )
                    log.warning("%s; retrying in %.1f s", exc, delay)
                    await self._wait_changed(delay)
        finally:
            metrics.cancel()
            policy.cancel()
            for task in leftovers:
                task.cancel()
            await self._stop_all_tasks()
            if self._outbox is not None:
                await asyncio.to_thread(self._outbox.close)
            await self._close_client()
            await self.executor.close()
            await asyncio.to_thread(self._probes.close)
            self._set_state(EngineState.STOPPED)

    def _adopt_leftovers(self, spooled: set[tuple[str, str]]) -> None:
        """Re-attach tasks an earlier run left running: they hold their leases (heartbeats
        renew them, capacity counts them) and report like any task. A lease the pool no
        longer honours stops the task, and its result is dropped as stale."""
        for spec in self.executor.adoptable():
            if (spec.task_id, spec.lease_id) in spooled or spec.task_id in self._running:
                # Its result was spooled before the crash: the outbox delivers that one.
                self._spawn(self.executor.cleanup(spec.task_id), "cleanup")
                continue
            run = _Running(spec=spec, started=time.time(), adopted=True)
            self._running[spec.task_id] = run
            run.task = asyncio.create_task(self._run_task(run), name=f"task-{spec.task_id}")

    # ------------------------------------------------------------------ commands, engine loop

    def _call(self, fn: Callable[[], object]) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            fn()  # not running yet: just record the wish
            return
        try:
            running_loop = asyncio.get_running_loop()
        except RuntimeError:
            running_loop = None
        if running_loop is loop:
            fn()
        else:
            loop.call_soon_threadsafe(fn)

    def _poke(self) -> None:
        if self._changed is not None:
            self._changed.set()

    def _do_start(self) -> None:
        self._want_running = True
        self._draining = False
        self._poke()

    def _do_pause(self) -> None:
        if self._paused:
            return
        self._paused = True
        self._withdraw_poll()
        self._sync_frozen()
        self._refresh_state()
        self._poke()

    def _do_resume(self) -> None:
        if not self._paused:
            return
        self._paused = False
        self._sync_frozen()  # the tasks stay frozen while the policy still says suspend
        self._refresh_state()
        self._poke()

    def _held(self) -> bool:
        """No new task now: paused by hand or by the policy."""
        return self._paused or self._suspended

    def _sync_frozen(self) -> None:
        """Freeze or thaw the running tasks to match the manual pause and the policy."""
        frozen = self._held()
        if frozen != self._frozen:
            self._frozen = frozen
            self._spawn(self.executor.pause() if frozen else self.executor.resume(), "freeze")

    def _do_drain(self) -> None:
        self._draining = True
        self._withdraw_poll()
        self._refresh_state()
        self._poke()

    def _withdraw_poll(self) -> None:
        """Cancel a long-poll in flight; the pool leases nothing on a cancelled call."""
        if self._poll_call is not None and not self._poll_call.done():
            self._poll_call.cancel()

    def _do_stop(self) -> None:
        self._want_running = False
        self._draining = False
        self._withdraw_poll()
        self._cancel_running()
        self._poke()

    def _do_shutdown(self) -> None:
        self._shutdown = True
        self._want_running = False
        self._withdraw_poll()
        self._cancel_running()
        self._poke()

    def _cancel_running(self) -> None:
        """Kill running tasks; their CANCELLED reports tell the pool to hand them out again."""
        for run in list(self._running.values()):
            if not run.finished and not run.cancel_requested:
                run.cancel_requested = True
                self._spawn(self.executor.cancel(run.spec.task_id), "cancel")

    def _do_apply(self, settings: Settings) -> None:
        reconnect = (
            settings.node_pool_address != self.settings.node_pool_address
            or settings.account != self.settings.account
            or settings.insecure != self.settings.insecure
        )
        self.settings = settings
        self._policy.configure(PolicySettings.from_settings(settings))
        self._share_applied = (-1.0, frozenset())  # re-applied at the next evaluation
        if reconnect and self._client is not None:
            self._spawn(self._close_client(), "reconnect")
        if self._running:  # only then is the loop running, and is there anything to bring in
            self._spawn(self.executor.apply_caps(self._caps()), "apply caps")
        self._poke()

    def _spawn(self, coro: Awaitable[object], what: str) -> None:
        async def guarded() -> None:
            try:
                await coro
            except Exception:
                log.exception("engine: %s failed", what)

        # Keep a reference until done: the loop holds only weak ones to tasks.
        task = asyncio.ensure_future(guarded())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # ------------------------------------------------------------------ state

    def _set_state(
        self, state: EngineState, message: str = "", retry_at: float | None = None
    ) -> None:
        if state == self._state and message == self._state_message:
            return
        self._state = state
        self._state_message = message
        log.info("state: %s%s", state.value, f" ({message})" if message else "")
        self._hub.publish(StateChanged(state, message, retry_at))

    def _refresh_state(self) -> None:
        if self._client is None or self._connected is None or not self._connected.is_set():
            return
        active = sum(1 for r in self._running.values() if not r.finished)
        if self._paused:
            self._set_state(EngineState.PAUSED)
        elif self._suspended and self._decision is not None:
            decision = self._decision
            self._set_state(
                EngineState.WAITING,
                decision.text + (f" — {decision.hint}" if decision.hint else ""),
                decision.resume_at,
            )
        elif self._draining:
            self._set_state(EngineState.DRAINING, f"{active} task(s) to finish")
        elif active:
            self._set_state(EngineState.BUSY, f"{active} task(s) running")
        else:
            self._set_state(EngineState.IDLE)

    def _reconnect_delay(self) -> float:
        """Backoff for the next connection attempt.

        While tasks hold leases the wait stays well inside the lease timeout, so a short
        outage does not cost their results.
        """
        cap = BACKOFF_MAX
        if self._running:
            cap = max(2.0, min(cap, self._lease_timeout - 2 * self._heartbeat_interval))
        delay = backoff_delay(self._attempt, cap=cap)
        self._attempt += 1
        return delay

    async def _wait_changed(self, timeout: float | None = None) -> None:
        assert self._changed is not None
        self._changed.clear()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    # ------------------------------------------------------------------ session

    def _caps(self) -> Resources:
        return Resources(
            cpus=self.settings.cpu_cap(),
            memory_bytes=self.settings.memory_cap_bytes(),
            disk_bytes=self.settings.disk_cap_bytes(),
            gpus=0,
        )

    def _in_use(self) -> Resources:
        total = Resources()
        for run in self._running.values():
            if not run.finished:
                total = total + run.spec.resources
        return total

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
            raise AuthError("Keyring unavailable", str(exc)) from None
        if not token:
            raise AuthError(
                "Not logged in",
                f"no login for the pool at {address}. Run `hivemind-worker login` first.",
            )
        client = client_for(self.settings, token=token)
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
            raise PoolError("Internal error", f"{type(first).__name__}: {first}") from first
        finally:
            if self._connected is not None:
                self._connected.clear()
            if self._client is client:
                self._client = None
            await client.close()

    async def _register(self, client: NodePoolClient) -> None:
        info = await asyncio.to_thread(self.monitor.info)
        caps = self._caps()
        reply = await client.register(
            pb.RegisterNodeRequest(
                node_id=self.node_id,
                hostname=info.hostname,
                cpu_cores=info.cpu_cores,
                memory_bytes=info.memory_bytes,
                disk_bytes=info.disk_bytes,
                capabilities=[self.executor.capability],
                agent_version=__version__,
                platform=info.platform,
                caps=caps.to_proto(),
                max_concurrent_tasks=self.settings.max_concurrent_tasks,
            )
        )
        if not reply.accepted:
            raise PoolError("Registration refused", reply.message or "the pool refused this node")
        if reply.heartbeat_interval_seconds:
            self._heartbeat_interval = float(reply.heartbeat_interval_seconds)
        if reply.max_wait_seconds:
            self._max_wait = int(reply.max_wait_seconds)
        if reply.lease_timeout_seconds:
            self._lease_timeout = float(reply.lease_timeout_seconds)
        if reply.preload_images:
            # Validated like a task's image before anything is fetched.
            images = [i for i in reply.preload_images if image_reference_ok(i)][:32]
            self._spawn(self.executor.preload(images), "preload images")
        log.info(
            "registered node %s with %s (heartbeat every %.0f s)",
            self.node_id,
            client.address,
            self._heartbeat_interval,
        )

    async def _watch_stop(self) -> None:
        """Ends the session when the person stops contributing, or when draining is done."""
        while True:
            if self._shutdown or not self._want_running:
                # Stopped tasks report CANCELLED (given back) while we are still connected;
                # a bounded wait, so an unresponsive pool cannot hold up the stop.
                deadline = time.monotonic() + GIVE_BACK_SECONDS
                while self._running and time.monotonic() < deadline:
                    await self._wait_changed(0.2)
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
            await self._wait_changed(1.0)
        raise _SessionOver()

    async def _heartbeat_loop(self, client: NodePoolClient) -> None:
        while True:
            await self._send_heartbeat(client)
            await asyncio.sleep(self._heartbeat_interval)

    async def _send_heartbeat(self, client: NodePoolClient) -> None:
        usage = self.executor.usage()
        running = [
            pb.RunningTask(
                task_id=r.spec.task_id,
                lease_id=r.spec.lease_id,
                usage=pb.ResourceUsage(
                    cpu_percent=usage[r.spec.task_id].cpu_percent,
                    memory_bytes=usage[r.spec.task_id].memory_bytes,
                    cpu_seconds=usage[r.spec.task_id].cpu_seconds,
                    network_rx_bytes=usage[r.spec.task_id].network_rx_bytes,
                    network_tx_bytes=usage[r.spec.task_id].network_tx_bytes,
                )
                if r.spec.task_id in usage
                else None,
            )
            for r in self._running.values()
        ]
        running += [
            pb.RunningTask(task_id=task_id, lease_id=lease_id)
            for task_id, lease_id in self._undelivered
            if task_id not in self._running
        ]
        status = (
            pb.NODE_STATUS_PAUSED
            if self._held()
            else pb.NODE_STATUS_DRAINING
            if self._draining
            else pb.NODE_STATUS_BUSY
            if running
            else pb.NODE_STATUS_IDLE
        )
        host = await asyncio.to_thread(self.monitor.sample)
        reply = await client.heartbeat(
            pb.UpdateNodeStatusRequest(
                node_id=self.node_id,
                status=status,
                timestamp_unix_ms=int(time.time() * 1000),
                metrics=host.to_proto(),
                running=running,
                status_message=self._status_message(),
            )
        )
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

    async def _poll_loop(self, client: NodePoolClient) -> None:
        while True:
            if self._held() or self._draining or not self._want_running:
                await self._wait_changed(5.0)
                continue
            active = sum(1 for r in self._running.values() if not r.finished)
            slots = self.settings.max_concurrent_tasks - active
            free = (self._caps() - self._in_use()).clamp_at_zero()
            if slots <= 0 or free.cpus <= 0 or free.memory_bytes <= 0:
                await self._wait_changed(5.0)
                continue
            if self._outbox is not None and await asyncio.to_thread(self._outbox.is_full):
                log.warning("the result spool is full; taking no task until results drain")
                await self._wait_changed(30.0)
                continue
            call = asyncio.ensure_future(
                client.get_tasks(
                    pb.GetAssignedTasksRequest(
                        node_id=self.node_id,
                        free=free.to_proto(),
                        max_tasks=slots,
                        # The offer carries the free capacity of this moment; while tasks
                        # run, it grows as they end, so the call is renewed every couple of
                        # seconds. (Withdrawing the call instead could drop a lease the pool
                        # has just handed out, lost until it expires.)
                        wait_seconds=self._max_wait if not active else BUSY_POLL_SECONDS,
                        capabilities=[self.executor.capability],
                        max_timeout_seconds=self.settings.task_timeout,
                        networks=sorted({"none", self.settings.docker_network}),
                    )
                )
            )
            self._poll_call = call
            try:
                await asyncio.wait({call})
            finally:
                if not call.done():  # this loop itself was cancelled
                    call.cancel()
                self._poll_call = None
            if call.cancelled():  # withdrawn by pause, drain or stop
                continue
            for spec in call.result():
                self._accept(spec)

    # ------------------------------------------------------------------ tasks

    def _accept(self, wire: pb.TaskSpec) -> None:
        try:
            spec = TaskSpec.from_proto(wire, require_lease=True)
        except TaskSpecError as exc:
            log.warning("refusing task %s: %s", wire.task_id[:128], exc)
            if wire.task_id and wire.lease_id:
                self._spawn(self._reject(wire.task_id, wire.lease_id, str(exc)), "reject")
            return
        earlier = self._running.get(spec.task_id)
        if earlier is not None:
            if earlier.adopted and earlier.spec.lease_id != spec.lease_id and earlier.task:
                # Re-queued while this worker was down and handed out anew: the pool no longer
                # honours the adopted lease. Stop that run (its report is dropped as stale),
                # then take the task up under the new lease.
                log.warning("task %s was re-queued; stopping its re-attached run", spec.task_id)
                if not earlier.finished and not earlier.cancel_requested:
                    earlier.cancel_requested = True
                    self._spawn(self.executor.cancel(spec.task_id), "cancel")
                self._spawn(self._accept_after(earlier.task, wire), "accept again")
                return
            if earlier.finished and earlier.task is not None:
                # Given back a moment ago (cancelled here) and handed out again while the
                # first run's report was still finishing: take it up once that run is gone.
                self._spawn(self._accept_after(earlier.task, wire), "accept again")
                return
            log.warning("task %s handed out twice; ignoring the second lease", spec.task_id)
            return
        if self._held() or self._draining or not self._want_running or self._shutdown:
            problem = "this worker has just paused or is stopping"
        else:
            problem = self._check_fits(spec)
        if problem:
            # Not the task's fault: give it back (CANCELLED) so the pool hands it to another
            # worker, instead of REJECTED, which ends it.
            log.warning("giving task %s back: %s", spec.task_id, problem)
            self._spawn(self._give_back(spec.task_id, spec.lease_id, problem), "give back")
            return
        run = _Running(spec=spec, started=time.time())
        self._running[spec.task_id] = run
        run.task = asyncio.create_task(self._run_task(run), name=f"task-{spec.task_id}")
        self._refresh_state()

    async def _accept_after(self, earlier: asyncio.Task[None], wire: pb.TaskSpec) -> None:
        await asyncio.wait({earlier})
        self._accept(wire)

    def _check_fits(self, spec: TaskSpec) -> str:
        if spec.timeout_seconds > self.settings.task_timeout:
            return (
                f"timeout {spec.timeout_seconds} s is over this worker's limit of "
                f"{self.settings.task_timeout} s"
            )
        if spec.network not in ("none", self.settings.docker_network):
            return f"network '{spec.network}' is not allowed on this worker"
        free = self._caps() - self._in_use()
        if not spec.resources.fits_in(free):
            r = spec.resources
            return (
                f"asks for {r.cpus:g} CPU, {r.memory_bytes >> 20} MiB memory, "
                f"{r.disk_bytes >> 20} MiB disk; only {max(free.cpus, 0):g} CPU, "
                f"{max(free.memory_bytes, 0) >> 20} MiB, {max(free.disk_bytes, 0) >> 20} MiB free"
            )
        return ""

    async def _reject(self, task_id: str, lease_id: str, reason: str) -> bool:
        """A spec this worker refuses to run anywhere: REJECTED ends the task at the pool."""
        result = TaskResult(task_id, lease_id, TaskStatus.REJECTED, exit_code=-1, error=reason)
        return await self._deliver(result)

    async def _give_back(self, task_id: str, lease_id: str, reason: str) -> bool:
        result = TaskResult(
            task_id, lease_id, TaskStatus.CANCELLED, exit_code=-1, error=f"declined: {reason}"
        )
        return await self._deliver(result)

    async def _run_task(self, run: _Running) -> None:
        spec = run.spec
        with task_context(spec.task_id):
            log.info(
                "%s %s (attempt %d)",
                "re-attaching to" if run.adopted else "starting",
                spec.label,
                spec.attempt,
            )
            self._hub.publish(
                TaskStarted(
                    spec.task_id,
                    spec.lease_id,
                    spec.label,
                    spec.kind.value,
                    spec.image,
                    spec.resources,
                    spec.attempt,
                )
            )
            result = await self._execute(spec, adopted=run.adopted)
            run.finished = True
            self._refresh_state()
            self._poke()
            if result.status is TaskStatus.SUCCEEDED:
                self.tasks_done += 1
            else:
                self.tasks_failed += 1
            duration = (result.finished_at or time.time()) - (result.started_at or run.started)
            log.info(
                "finished %s: %s%s", spec.label, result.status.value,
                f" ({result.error})" if result.error else "",
            )  # fmt: skip
            self._hub.publish(
                TaskFinished(
                    spec.task_id,
                    spec.lease_id,
                    spec.label,
                    result.status,
                    result.exit_code,
                    result.error,
                    duration,
                    result.archive_size,
                    result.cpu_seconds,
                )
            )
            spooled = await self._spool(result, spec.max_result_bytes)
            archive = result.archive  # _deliver may drop it from the result
            with contextlib.suppress(Exception):
                await self.executor.cleanup(spec.task_id)
            try:
                done = await self._deliver(result, spec.max_result_bytes)
            finally:
                if spooled:
                    if done:
                        await asyncio.to_thread(self._outbox_remove, spec.task_id, spec.lease_id)
                elif archive is not None:
                    archive.unlink(missing_ok=True)
                self._running.pop(spec.task_id, None)
                self._refresh_state()
                self._poke()

    async def _spool(self, result: TaskResult, max_result_bytes: int) -> bool:
        """Keep the result on disk until the pool has it; False when it could not be kept."""
        if self._outbox is None:
            return False
        try:
            await asyncio.to_thread(self._outbox.put, result, max_result_bytes)
        except OutboxFull as exc:
            log.error("%s", exc)
            self._hub.publish(ErrorRaised("Result spool full", str(exc)))
            return False
        except OSError as exc:
            log.error("could not spool the result of %s: %s", result.task_id, exc)
            return False
        return True

    def _outbox_remove(self, task_id: str, lease_id: str) -> None:
        if self._outbox is not None:
            self._outbox.remove(task_id, lease_id)

    async def _deliver_spooled(self, pending: Pending) -> None:
        """A result left from an earlier run: deliver it, and keep its lease alive meanwhile."""
        result = pending.result
        key = (result.task_id, result.lease_id)
        self._undelivered[key] = result
        try:
            with task_context(result.task_id):
                log.info("delivering the result of %s kept from an earlier run", result.task_id)
                if await self._deliver(result, pending.max_result_bytes):
                    await asyncio.to_thread(self._outbox_remove, *key)
        finally:
            self._undelivered.pop(key, None)

    async def _execute(self, spec: TaskSpec, *, adopted: bool = False) -> TaskResult:
        def on_log(task_id: str, chunk: bytes) -> None:
            self._hub.publish(TaskOutput(task_id, chunk.decode("utf-8", "replace")))

        started = time.time()
        try:
            if adopted:
                return await self.executor.reattach(spec, on_log)
            await self.executor.prepare(spec)
            run = self._running.get(spec.task_id)
            if run is not None and run.cancel_requested:
                return TaskResult(spec.task_id, spec.lease_id, TaskStatus.CANCELLED, -1,
                                  "cancelled before it started", started_at=started,
                                  finished_at=time.time())  # fmt: skip
            return await self.executor.run(spec, spec.resources, on_log)
        except TaskSpecError as exc:
            return TaskResult(spec.task_id, spec.lease_id, TaskStatus.REJECTED, -1, str(exc),
                              started_at=started, finished_at=time.time())  # fmt: skip
        except ExecutorError as exc:
            return TaskResult(spec.task_id, spec.lease_id, TaskStatus.FAILED, -1, str(exc),
                              started_at=started, finished_at=time.time())  # fmt: skip
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an executor bug must not take the engine down
            log.exception("executor failed on %s", spec.task_id)
            return TaskResult(spec.task_id, spec.lease_id, TaskStatus.FAILED, -1,
                              f"worker error: {exc}", started_at=started,
                              finished_at=time.time())  # fmt: skip

    async def _deliver(self, result: TaskResult, max_result_bytes: int = 0) -> bool:
        """Upload the archive and report, until the pool has it or refuses it.

        Transient failures (pool unreachable, node forgotten, login expired) wait for the
        session to come back. A stale lease drops the result. Any other refusal is reported
        once as FAILED without the archive, so the task ends instead of holding its lease
        forever. Returns True once the result is settled either way, False when we stopped
        first (a spooled result is then delivered at the next start).
        """
        if result.archive is not None and not result.archive_sha256:
            result.archive_sha256, result.archive_size = await asyncio.to_thread(
                file_sha256, result.archive
            )
        if (
            max_result_bytes
            and result.archive is not None
            and result.archive_size > max_result_bytes
        ):
            result.status = TaskStatus.FAILED
            result.error = (
                f"results are {result.archive_size} bytes packed, over the task's limit of "
                f"{max_result_bytes} bytes"
            )
            result.archive = None
        unexpected = 0
        attempt = 0
        while True:
            client = await self._wait_connected()
            if client is None:
                # Stopped: the lease expires and the pool hands the task out again.
                log.warning("stopped before the result of %s was delivered", result.task_id)
                return False
            try:
                await self._send_result(client, result)
            except StaleLeaseError as exc:
                log.warning("result of %s dropped: %s", result.task_id, exc.message)
                self._hub.publish(
                    ResultDelivered(result.task_id, result.lease_id, False, exc.message)
                )
                return True
            except (PoolUnavailable, NodeUnknownError, AuthError) as exc:
                delay = backoff_delay(attempt)
                attempt += 1
                log.warning(
                    "could not deliver %s (%s); retrying in %.1f s", result.task_id, exc, delay
                )
                await asyncio.sleep(delay)
                continue
            except PoolError as exc:
                if result.archive is None and result.status is TaskStatus.FAILED:
                    log.error("the pool refused the report of %s: %s", result.task_id, exc)
                    self._hub.publish(
                        ResultDelivered(result.task_id, result.lease_id, False, exc.message)
                    )
                    return True
                log.error("the pool refused the result of %s: %s", result.task_id, exc)
                result.status = TaskStatus.FAILED
                result.error = f"result refused by the pool: {exc.message}"[:4000]
                result.archive = None
                continue
            except Exception as exc:  # e.g. the channel closed under us at a reconnect
                unexpected += 1
                if unexpected > MAX_UNEXPECTED_DELIVERY_ERRORS:
                    log.exception("giving up delivering %s", result.task_id)
                    self._hub.publish(
                        ResultDelivered(result.task_id, result.lease_id, False, str(exc))
                    )
                    return True
                log.warning("delivering %s failed (%r); retrying", result.task_id, exc)
                await asyncio.sleep(backoff_delay(unexpected))
                continue
            log.info("result of %s delivered", result.task_id)
            self._hub.publish(ResultDelivered(result.task_id, result.lease_id, True))
            return True

    async def _send_result(self, client: NodePoolClient, result: TaskResult) -> None:
        archive = result.archive
        if archive is not None:
            await client.upload(
                pb.UploadHeader(
                    node_id=self.node_id,
                    task_id=result.task_id,
                    lease_id=result.lease_id,
                    total_size=result.archive_size,
                    sha256=result.archive_sha256,
                ),
                archive,
            )
        await client.report(
            pb.ReportTaskResultRequest(
                node_id=self.node_id,
                task_id=result.task_id,
                lease_id=result.lease_id,
                status=result.status.to_proto(),
                exit_code=result.exit_code,
                error=result.error[:4000],
                log_tail=result.log_tail[-LOG_TAIL_REPORT_BYTES:],
                result_sha256=result.archive_sha256 if archive is not None else "",
                result_size=result.archive_size if archive is not None else 0,
                started_unix_ms=int(result.started_at * 1000),
                finished_unix_ms=int(result.finished_at * 1000),
                usage=pb.ResourceUsage(
                    cpu_seconds=result.cpu_seconds, max_memory_bytes=result.max_memory_bytes
                ),
            )
        )

    async def _wait_connected(self) -> NodePoolClient | None:
        """The live client; None once we are stopping and the session is gone."""
        assert self._connected is not None
        while True:
            if self._client is not None and self._connected.is_set():
                return self._client
            if self._shutdown or not self._want_running:
                return None
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._connected.wait(), 1.0)

    async def _stop_all_tasks(self) -> None:
        runs = [r for r in self._running.values() if r.task is not None]
        for run in runs:
            if not run.finished:
                with contextlib.suppress(Exception):
                    await self.executor.cancel(run.spec.task_id)
        for run in runs:
            assert run.task is not None
            run.task.cancel()
        await asyncio.gather(*(r.task for r in runs if r.task is not None), return_exceptions=True)
        for run in runs:
            with contextlib.suppress(Exception):
                await self.executor.cleanup(run.spec.task_id)
        self._running.clear()

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()

    # ------------------------------------------------------------------ metrics

    async def _metrics_loop(self) -> None:
        while True:
            try:
                host = await asyncio.to_thread(self.monitor.sample)
                self._hub.publish(MetricsSample(host, self.executor.usage()))
            except Exception:
                log.exception("metrics sample failed")
            await asyncio.sleep(METRICS_INTERVAL)

    # ------------------------------------------------------------------ when to contribute

    async def _policy_loop(self) -> None:
        while True:
            try:
                if self._want_running:  # stopped, there is nothing to decide about
                    await self._evaluate_policy()
            except Exception:
                log.exception("policy evaluation failed")
            for _ in range(POLICY_SLICES):
                await asyncio.sleep(POLICY_INTERVAL / POLICY_SLICES)
                if await self._input_seen():
                    break

    async def _input_seen(self) -> bool:
        """Between evaluations, a look at input idle time alone (one X round trip) while
        "only when idle" lets tasks run: a person touching the mouse then freezes them well
        within a second, without running every probe more often."""
        minutes = self._policy.settings.idle_only_minutes
        if minutes <= 0 or self._suspended or not self._running:
            return False
        try:
            idle = await asyncio.to_thread(self._probes.idle_seconds)
        except Exception:
            log.exception("idle probe failed")
            return False
        return idle is not None and idle < minutes * 60

    async def _evaluate_policy(self) -> None:
        self._last_seen = await asyncio.to_thread(self._probes.observe)
        self._apply_decision(self._policy.evaluate(self._last_seen, _now()))

    def _apply_decision(self, decision: Decision) -> None:
        """Act on one decision: freeze or thaw, throttle, give leases back; say what changed."""
        previous, self._decision = self._decision, decision
        suspended = decision.verdict is Verdict.SUSPEND
        if suspended != self._suspended:
            self._suspended = suspended
            self._suspended_at = time.monotonic() if suspended else None
            self._gave_back = False
            if suspended:
                self._withdraw_poll()
            self._sync_frozen()
            self._poke()
        if not decision.same_as(previous):
            line = decision.line()
            if previous is not None or decision.verdict is not Verdict.RUN:
                log.info("when to contribute: %s", line)
            self._publish_policy(decision)
            self._refresh_state()
        self._apply_share(decision)
        limit = self._policy.settings.give_back_minutes * 60
        if (
            suspended
            and limit > 0
            and not self._gave_back
            and self._suspended_at is not None
            and time.monotonic() - self._suspended_at >= limit
        ):
            self._give_back_all(decision)

    def _apply_share(self, decision: Decision) -> None:
        """Bring running tasks to the policy's CPU-time share (and new tasks as they start)."""
        share = decision.throttle_percent / 100.0
        running = frozenset(r.spec.task_id for r in self._running.values() if not r.finished)
        if (share, running) == self._share_applied:
            return
        changed = share != self._share_applied[0]
        self._share_applied = (share, running)
        self.executor.cpu_time_share = share
        if running and (changed or share < 1.0):
            self._spawn(self.executor.apply_caps(self._caps()), "apply CPU share")

    def _give_back_all(self, decision: Decision) -> None:
        """Suspended past the limit: stop the frozen tasks; their CANCELLED reports give the
        leases back, so the pool runs them elsewhere. Nothing new is taken meanwhile."""
        self._gave_back = True
        runs = [r for r in self._running.values() if not r.finished and not r.cancel_requested]
        if not runs:
            return
        minutes = self._policy.settings.give_back_minutes
        log.warning(
            "suspended for %g minutes (%s): giving %d task(s) back to the pool to run elsewhere",
            minutes, decision.text, len(runs),
        )  # fmt: skip
        self._cancel_running()
        self._publish_policy(decision, given_back=len(runs))

    def _publish_policy(self, decision: Decision, given_back: int = 0) -> None:
        line = decision.line()
        if given_back:
            line += f"; gave {given_back} task(s) back to the pool"
        self._hub.publish(
            PolicyChanged(
                decision,
                line,
                manual_pause=self._paused,
                override_until=self._policy.override_until,
                given_back=given_back,
            )
        )

    def _status_message(self) -> str:
        if self._paused:
            return "paused by hand"
        if self._suspended and self._decision is not None:
            return self._decision.text
        return ""

    def publish(self, event: Event) -> None:
        """For collaborators (executors, CLI) that want to add to the event stream."""
        self._hub.publish(event)


def _now() -> datetime:
    """Local wall-clock time, for the schedule."""
    return datetime.now().astimezone()


def _first_leaf(group: BaseExceptionGroup[BaseException]) -> BaseException:
    """The first exception in a (possibly nested) exception group, preferring _SessionOver."""
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
        super().__init__("Stopped", "session over")
