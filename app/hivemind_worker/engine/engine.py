"""WorkerEngine: the Qt-free facade that connects to a pool, takes tasks, runs them and reports."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from hivemind_worker.config import Settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.engine.aio import wait_at_most
from hivemind_worker.engine.contribute import Contribute
from hivemind_worker.engine.delivery import Delivery, backoff_delay
from hivemind_worker.engine.events import (
    EngineState,
    ErrorRaised,
    EventHub,
    ImagePull,
    MetricsSample,
    SandboxChosen,
    StateChanged,
    Subscriber,
    TaskProgress,
)
from hivemind_worker.engine.executors.base import Executor
from hivemind_worker.engine.monitor import HostMonitor, HostSample
from hivemind_worker.engine.pool_client import (
    AuthError,
    NodePoolClient,
    PoolError,
    RefusedSpec,
    client_for,
)
from hivemind_worker.engine.probes import Probes
from hivemind_worker.engine.runs import TaskRuns, _Running
from hivemind_worker.engine.session import Session, _SessionOver
from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.tasks import (
    Resources,
    TaskSpec,
)

log = logging.getLogger(__name__)

BACKOFF_MAX = 60.0
AUTH_RETRY_SECONDS = 60.0
METRICS_INTERVAL = 1.0  # while someone watches (watch_metrics); else at heartbeats only


class WorkerEngine(Session, TaskRuns, Contribute):
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
        executor: Executor | Callable[[], Executor],
        outbox_dir: Path,
        client_factory: Callable[..., NodePoolClient] = client_for,
        probes: Probes | None = None,
    ) -> None:
        self.settings = settings
        self.node_id = node_id
        self.credentials = credentials
        # An executor, or how to choose one: choosing pings Docker and tidies what an earlier
        # run left (blocking, a few hundred ms), so the desktop app has it done on the
        # engine's thread when run() starts, after its window is up.
        self._executor: Executor | None = None
        self._make_executor = None if isinstance(executor, Executor) else executor
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
        # Waiters woken by _poke: capacity, commands, settings or the connection changed.
        # One future per waiter, so one waiter can never swallow another's wake-up.
        self._waiters: set[asyncio.Future[None]] = set()
        self._watching = False  # someone looks at live metrics (the dashboard is open)
        self._watch_changed: asyncio.Event | None = None
        self._last_sample: tuple[float, HostSample] | None = None  # (monotonic, sample)
        self._running: dict[str, _Running] = {}
        self._client_factory = client_factory
        self.delivery = Delivery(
            outbox_dir, node_id, publish=self._hub.publish, wait_client=self._wait_connected
        )
        self._background: set[asyncio.Future[None]] = set()
        self._heartbeat_interval = float(settings.heartbeat_interval)
        self._lease_timeout = 60.0
        self._max_wait = 30
        self._attempt = 0  # reconnect attempts since the last successful registration
        self._poll_call: asyncio.Future[list[TaskSpec | RefusedSpec]] | None = None
        if isinstance(executor, Executor):
            self._use_executor(executor)
        self._init_policy(settings, probes)  # when to contribute: contribute.py
        self.tasks_done = 0
        self.tasks_failed = 0

    @property
    def executor(self) -> Executor:
        """The executor; chosen by the time run() has published SandboxChosen."""
        if self._executor is None:
            raise RuntimeError("the executor is chosen when the engine starts; use executor_ready")
        return self._executor

    @property
    def executor_ready(self) -> Executor | None:
        """The executor once chosen; None until then (for a window shown before the engine)."""
        return self._executor

    def _use_executor(self, executor: Executor) -> None:
        executor.on_pull = self._on_pull
        executor.on_environment = self._on_environment
        executor.slots = self.settings.max_concurrent_tasks
        self._executor = executor

    def _on_pull(self, image: str, done: int, total: int) -> None:
        # Called from the executor's pull thread: the event is published on the engine loop.
        self._call(lambda: self._hub.publish(ImagePull(image, done, total)))

    def _on_environment(self, task_id: str, name: str, line: str) -> None:
        # Called from the thread that builds a runner environment, like _on_pull.
        event = TaskProgress(task_id, 0, 0, "environment", text=f"{name}: {line}")
        self._call(lambda: self._hub.publish(event))

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

    def cancel_task(self, task_id: str, *, exclude_here: bool = True) -> None:
        """Stop one running task; it is reported CANCELLED and the pool hands it out again,
        to another node: the report asks the pool not to give it back to this one (unless
        `exclude_here` is False: then it is given back as a stop gives tasks back)."""

        def cancel() -> None:
            run = self._running.get(task_id)
            if run is not None and not run.finished and not run.cancel_requested:
                run.cancel_requested = True
                run.exclude_here = exclude_here
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

    def watch_metrics(self, on: bool) -> None:
        """Sample host and task metrics once a second while `on` (a dashboard is open);
        otherwise only when a heartbeat needs them. An idle worker nobody watches then wakes
        only for the pool."""

        def watch() -> None:
            self._watching = on
            if self._watch_changed is not None:
                self._watch_changed.set()

        self._call(watch)

    @property
    def watching_metrics(self) -> bool:
        return self._watching

    def apply_settings(self, settings: Settings) -> None:
        """New caps, limits and kinds of task apply to the next offer at once (the pool is told
        of new kinds by registering again); a new pool address reconnects."""
        self._call(lambda: self._do_apply(settings))

    async def run(self, *, autostart: bool = True) -> None:
        """The engine's main coroutine; returns after shutdown()."""
        self._loop = asyncio.get_running_loop()
        self._connected = asyncio.Event()
        self._watch_changed = asyncio.Event()
        self._want_running = autostart or self._want_running
        if self._executor is None:
            assert self._make_executor is not None
            self._use_executor(await asyncio.to_thread(self._make_executor))
        self._hub.publish(SandboxChosen(self.executor.capability, self.executor.notice))
        metrics = asyncio.create_task(self._metrics_loop(), name="metrics")
        policy = asyncio.create_task(self._policy_loop(), name="policy")
        leftovers: list[asyncio.Task[None]] = []
        spooled: set[tuple[str, str]] = set()
        if self.executor.notice:
            self._hub.publish(
                ErrorRaised.of(
                    HiveMindError(
                        self.executor.notice,
                        title="Docker not available",
                        kind=ErrorKind.DOCKER_MISSING,
                    )
                )
            )
        for pending in await self.delivery.open():
            spooled.add((pending.result.task_id, pending.result.lease_id))
            leftovers.append(asyncio.create_task(self.delivery.deliver_spooled(pending)))
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
                        EngineState.ERROR,
                        exc.message,
                        time.time() + AUTH_RETRY_SECONDS,
                        exc.kind,
                        exc.details,
                    )
                    self._hub.publish(ErrorRaised.of(exc))
                    await self._wait_changed(AUTH_RETRY_SECONDS)
                except PoolError as exc:
                    delay = self._reconnect_delay()
                    self._set_state(
                        EngineState.CONNECTING,
                        f"{exc.message} Retrying in {delay:.0f} s.",
                        time.time() + delay,
                        exc.kind,
                        exc.details,
                    )
                    log.warning("%s; retrying in %.1f s%s", exc, delay,
                                f" ({exc.details})" if exc.details else "")  # fmt: skip
                    await self._wait_changed(delay)
        finally:
            metrics.cancel()
            policy.cancel()
            for task in leftovers:
                task.cancel()
            # Ended here, not left to asyncio.run: a loop still running after run() returns
            # would hold up the end of the engine thread.
            await asyncio.gather(metrics, policy, return_exceptions=True)
            await self._stop_all_tasks()
            await self.delivery.close()
            await self._close_client()
            await self.executor.close()
            await asyncio.to_thread(self._probes.close)
            self._set_state(EngineState.STOPPED)

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
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

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

    def _do_drain(self) -> None:
        self._draining = True
        self._withdraw_poll()
        self._standby()
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
        self._standby()
        self._poke()

    def _standby(self) -> None:
        """No task is coming: the executor lets go of sandboxes it keeps ready."""
        if self._executor is not None and self._loop is not None and not self._loop.is_closed():
            self._spawn(self._executor.standby(), "standby")

    def _do_shutdown(self) -> None:
        self._shutdown = True
        self._want_running = False
        self._withdraw_poll()
        self._cancel_running()
        self._poke()

    def _do_apply(self, settings: Settings) -> None:
        reconnect = (
            settings.node_pool_address != self.settings.node_pool_address
            or settings.account != self.settings.account
            or settings.insecure != self.settings.insecure
        )
        # Only a live session has told the pool its kinds (and only then is the executor,
        # whose capability they include, sure to be chosen).
        capabilities = self._capabilities() if self._client is not None else ()
        self.settings = settings
        if self._executor is not None:
            self._executor.slots = settings.max_concurrent_tasks
        self._configure_policy(settings)
        if reconnect and self._client is not None:
            self._spawn(self._close_client(), "reconnect")
        elif self._client is not None and self._capabilities() != capabilities:
            # A kind of task turned on or off: the pool's record of this node is updated, and
            # the long-poll in flight (which offers the old kinds) gives way to one that
            # offers the new ones.
            self._spawn(self._register(self._client), "register the new capabilities")
            self._withdraw_poll()
        if self._executor is not None and self._loop is not None and not self._loop.is_closed():
            # Running tasks brought within the caps; sandboxes kept ready for the old ones go.
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
        self,
        state: EngineState,
        message: str = "",
        retry_at: float | None = None,
        error_kind: ErrorKind | None = None,
        details: str = "",
    ) -> None:
        if state == self._state and message == self._state_message:
            return
        self._state = state
        self._state_message = message
        log.info("state: %s%s", state.value, f" ({message})" if message else "")
        self._hub.publish(StateChanged(state, message, retry_at, error_kind, details))

    def _refresh_state(self) -> None:
        if self._client is None or self._connected is None or not self._connected.is_set():
            return
        active = sum(1 for r in self._running.values() if not r.finished)
        if self._paused:
            self._set_state(EngineState.PAUSED)
        elif self._waiting_state():
            pass  # WAITING, with the policy's reason
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
        """Until the next _poke, or `timeout` seconds. The caller checks its condition first,
        with no await between the check and this call, so no wake-up falls in between."""
        assert self._loop is not None
        waiter: asyncio.Future[None] = self._loop.create_future()
        self._waiters.add(waiter)
        try:
            await wait_at_most(waiter, timeout)
        finally:
            self._waiters.discard(waiter)

    # ------------------------------------------------------------------ session

    def _caps(self) -> Resources:
        return Resources(
            cpus=self.settings.cpu_cap(),
            memory_bytes=self.settings.memory_cap_bytes(),
            disk_bytes=self.settings.disk_cap_bytes(),
            gpus=0,
        )

    async def _wait_connected(self) -> NodePoolClient | None:
        """The live client; None once we are stopping and the session is gone."""
        assert self._connected is not None
        while True:
            if self._client is not None and self._connected.is_set():
                return self._client
            if self._shutdown or not self._want_running:
                return None
            await self._wait_changed()  # the session pokes when it connects

    async def _close_client(self) -> None:
        client, self._client = self._client, None
        self._poke()  # the session notices it has to reconnect
        if client is not None:
            await client.close()

    # ------------------------------------------------------------------ metrics

    async def _metrics_loop(self) -> None:
        """Once a second while someone watches; asleep otherwise (heartbeats sample then)."""
        assert self._watch_changed is not None
        while True:
            if not self._watching:
                self._watch_changed.clear()
                await self._watch_changed.wait()
                continue
            try:
                host = await self._sample_host()
                self._hub.publish(MetricsSample(host, self.executor.usage()))
            except Exception:
                log.exception("metrics sample failed")
            self._watch_changed.clear()
            await wait_at_most(self._watch_changed.wait(), METRICS_INTERVAL)

    async def _sample_host(self) -> HostSample:
        host = await asyncio.to_thread(self.monitor.sample)
        self._last_sample = (time.monotonic(), host)
        return host

    async def _heartbeat_sample(self) -> HostSample:
        """The host sample a heartbeat carries. While someone watches, the last one-second
        sample serves; otherwise a fresh one, which the dashboard's history gets too (the
        charts catch up from it when the window is shown again)."""
        last = self._last_sample
        fresh = last is not None and time.monotonic() - last[0] < 2 * METRICS_INTERVAL
        if self._watching and fresh and last is not None:
            return last[1]
        host = await self._sample_host()
        if not self._watching:
            self._hub.publish(MetricsSample(host, self.executor.usage()))
        return host
