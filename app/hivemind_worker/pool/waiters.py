"""Parked long-polls in a FIFO queue: new work wakes exactly one poll that can run it."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from hivemind_worker.tasks import Resources, TaskKind
from hivemind_worker.pool.records import KIND_CAPABILITIES, TaskNeed


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
    woken: asyncio.Event = field(default_factory=asyncio.Event)
    woken_for: TaskNeed | None = None

    def can_take(self, need: TaskNeed) -> bool:
        return (
            bool(KIND_CAPABILITIES[TaskKind(need.kind)] & self.capabilities)
            and need.resources.fits_in(self.free)
            and (not self.max_timeout_seconds or need.timeout_seconds <= self.max_timeout_seconds)
            and need.network in self.networks
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
            if waiter.can_take(need):
                del self._parked[waiter]
                waiter.woken_for = need
                waiter.woken.set()
                self.wakeups += 1
                return waiter
        return None
