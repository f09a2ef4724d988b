"""Parked long-polls in a FIFO queue: new work wakes exactly one poll that can run it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hivemind_worker.pool.records import KIND_CAPABILITIES, TaskNeed
from hivemind_worker.tasks import Resources, TaskKind


@dataclass(eq=False)
class Waiter:
    """One parked GetAssignedTasks: what its worker can take, and how to wake it.

    `woken_for` is set to the task it was woken for; the poll then takes its lease itself
    (one short transaction), so a poll whose caller has gone away never takes one.
    """

    node_id: str
    free: Resources
    capabilities: frozenset[str]
    max_timeout_seconds: int  # 0: any timeout
    networks: frozenset[str]
    # A future, not an Event under wait_for: on Python 3.11 wait_for returns an inner result
    # that is ready even when its caller was cancelled, and a poll whose caller is gone must
    # not go on to take a lease.
    woken: asyncio.Future[None] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )
    woken_for: TaskNeed | None = None

    def can_take(self, need: TaskNeed) -> bool:
        return (
            bool(KIND_CAPABILITIES[TaskKind(need.kind)] & self.capabilities)
            and need.resources.fits_in(self.free)
            and (not self.max_timeout_seconds or need.timeout_seconds <= self.max_timeout_seconds)
            and need.network in self.networks
            and (not need.needs or need.needs in self.capabilities)
        )


class WaiterQueue:
    """The parked polls, oldest first. Everything runs on the pool's event loop: no locks.

    `offer(need)` removes the oldest poll that can run the task and wakes it; nobody else
    wakes. A scan passes over polls that cannot run the task; on a pool of like workers
    the first one usually can, so an offer costs O(1) there and O(parked) at worst.
    """

    def __init__(self) -> None:
        self._parked: dict[Waiter, None] = {}  # insertion-ordered: FIFO with O(1) removal
        self.wakeups = 0  # polls woken since start

    def __len__(self) -> int:
        return len(self._parked)

    def park(self, waiter: Waiter) -> None:
        self._parked[waiter] = None

    def unpark(self, waiter: Waiter) -> None:
        self._parked.pop(waiter, None)

    def offer(self, need: TaskNeed) -> Waiter | None:
        """Wake the oldest parked poll that can run `need`; that poll, or None if none can."""
        for waiter in self._parked:
            if waiter.can_take(need) and not waiter.woken.done():
                del self._parked[waiter]
                waiter.woken_for = need
                waiter.woken.set_result(None)
                self.wakeups += 1
                return waiter
        return None
