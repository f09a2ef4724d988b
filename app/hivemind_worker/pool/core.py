"""What the pool's services share: store, stats, auth, parked long-polls and heartbeats."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field

import grpc

from hivemind_worker.pool.common import Context, LoginThrottle, PoolConfig, PoolStats, Refused
from hivemind_worker.pool.heartbeats import Liveness
from hivemind_worker.pool.interface import TaskStore
from hivemind_worker.pool.pace import Pacer
from hivemind_worker.pool.records import TaskNeed
from hivemind_worker.pool.waiters import Waiter, WaiterQueue
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import Resources

log = logging.getLogger("hivemind_worker.pool")


@dataclass
class Upload:
    """One upload in flight: `stop` asks it to give way, `finished` says it has."""

    stop: asyncio.Event = field(default_factory=asyncio.Event)
    finished: asyncio.Event = field(default_factory=asyncio.Event)


@dataclass(frozen=True)
class PollRequest:
    """A checked GetAssignedTasks: who asks, and what its worker can take."""

    node_id: str
    free: Resources
    max_tasks: int
    capabilities: frozenset[str]
    max_timeout_seconds: int
    networks: frozenset[str]


class PoolCore:
    """What both services share: config, store, stats, auth, long-polls and heartbeats."""

    def __init__(self, config: PoolConfig, store: TaskStore, stats: PoolStats) -> None:
        self.config = config
        self.store = store
        self.stats = stats
        self.waiters = WaiterQueue()
        # How often workers beat, by how many there are (pace.py); leases last as long.
        self.pacer = Pacer(
            config.heartbeat_interval, config.lease_timeout, config.max_heartbeats_per_second
        )
        self.liveness = Liveness(store, lambda: self.pacer.pace.lease_timeout)
        self.login_slots = asyncio.Semaphore(max(config.login_concurrency, 1))
        self.login_throttle = LoginThrottle(config.login_max_failures, config.login_failure_window)
        self.spool = config.spool_path
        # The upload in flight for each lease. A new one from the lease holder supersedes it:
        # a worker retries when its connection died mid-upload, often before this pool has
        # noticed the death, and only the lease holder can upload for the lease.
        self.uploading: dict[str, Upload] = {}
        self.upload_bytes = 0  # declared sizes of the uploads in flight
        # A test seam: awaited before each chunk of an upload is moved into the database.
        self.before_result_chunk: Callable[[str, int], Awaitable[None]] | None = None

    # ------------------------------------------------------------------ work for polls

    def offer(self, need: TaskNeed) -> None:
        """A task became queued: wake the one parked poll that can run it, if any."""
        self.waiters.offer(need)

    def offer_queued(self, task_ids: Iterable[str]) -> None:
        """Tasks went back to the queue (expiry, give-back): offer each still queued."""
        for task_id in task_ids:
            need = self.store.task_need(task_id)
            if need is not None:
                self.offer(need)

    async def lease_or_wait(self, poll: PollRequest, wait: float) -> list[pb.TaskSpec]:
        """Lease what fits now; else park the poll until a task it can run is offered.

        A parked poll runs no SQLite statement until it is woken for a task, and then takes
        its lease itself in one short transaction. A poll woken for a task that took another
        one instead offers its task on, so no task waits while a parked poll could run it.
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while True:
            specs = self._lease(poll)
            if specs:
                return specs
            left = deadline - loop.time()
            if left <= 0:
                return []
            woken_for = await self._park(poll, left)
            if woken_for is None:
                return []
            specs = self._lease(poll)
            if specs:
                if woken_for.task_id not in {s.task_id for s in specs}:
                    # It took an older task that fits; the one it was woken for may still
                    # be queued. (Only after a lease: an empty one means it is gone.)
                    self.offer_queued([woken_for.task_id])
                return specs
            # Someone else took the task first (a new poll, or an earlier-woken one): park
            # again. The read at the top of the loop finds nothing and writes nothing.

    def _lease(self, poll: PollRequest) -> list[pb.TaskSpec]:
        return self.store.lease_tasks(
            poll.node_id,
            poll.free,
            poll.max_tasks,
            poll.capabilities,
            lease_seconds=self.pacer.pace.lease_timeout,
            max_timeout_seconds=poll.max_timeout_seconds,
            networks=poll.networks,
        )

    async def _park(self, poll: PollRequest, timeout: float) -> TaskNeed | None:
        """Wait in the queue until woken (the task offered) or `timeout` ends (None)."""
        waiter = Waiter(
            node_id=poll.node_id,
            free=poll.free,
            capabilities=poll.capabilities,
            max_timeout_seconds=poll.max_timeout_seconds,
            networks=poll.networks,
        )
        self.waiters.park(waiter)
        # A timer that resolves the future, rather than asyncio.wait or wait_for: one handle
        # per parked poll, and a cancel (the caller left) still ends the wait at once.
        timer = asyncio.get_running_loop().call_later(timeout, _time_up, waiter.woken)
        try:
            await waiter.woken
        except asyncio.CancelledError:
            if waiter.woken_for is not None:  # woken, but gone before taking it: pass it on
                self.offer_queued([waiter.woken_for.task_id])
            raise
        finally:
            timer.cancel()
            self.waiters.unpark(waiter)
        return waiter.woken_for

    # ------------------------------------------------------------------------- auth

    def user(self, context: Context) -> str:
        """The caller's username from `authorization: Bearer <token>`, or Refused."""
        value: str | bytes | None = None
        for key, val in context.invocation_metadata() or ():
            if key == "authorization":
                value = val
        if isinstance(value, bytes):
            value = value.decode(errors="replace")
        if not value:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "missing bearer token")
        scheme, _, token = value.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Refused(
                grpc.StatusCode.UNAUTHENTICATED, "authorization metadata must be 'Bearer <token>'"
            )
        username = self.store.token_user(token.strip())  # TokenExpired maps to UNAUTHENTICATED
        if username is None:
            raise Refused(grpc.StatusCode.UNAUTHENTICATED, "unknown token; log in again")
        return username


def _time_up(woken: asyncio.Future[None]) -> None:
    if not woken.done():
        woken.set_result(None)
