"""Group commit for heartbeats: the beats that arrive within a few milliseconds share one commit."""

from __future__ import annotations

import asyncio
import logging

from hivemind_worker.pool.interface import TaskStore
from hivemind_worker.pool.records import Heartbeat, HeartbeatOutcome

log = logging.getLogger("hivemind_worker.pool")

#: How long the first beat of a batch waits for others to join it. Small next to the heartbeat
#: deadline (seconds) and to a lease's life (a minute); large enough to gather the beats of a
#: thousand workers into a few commits a second.
GROUP_COMMIT_SECONDS = 0.002
#: A batch is written at once when it reaches this many beats, so no transaction grows long.
MAX_BATCH = 500


class HeartbeatBatcher:
    """Collects heartbeats and records each batch in one store transaction.

    A caller awaits its own outcome (lost leases, cancels), which it gets only after the
    transaction that recorded its beat has committed: a worker is never told a lease is
    renewed before it is.
    """

    def __init__(self, store: TaskStore, lease_seconds: float) -> None:
        self._store = store
        self._lease_seconds = lease_seconds
        self._pending: list[tuple[Heartbeat, asyncio.Future[HeartbeatOutcome]]] = []
        self._timer: asyncio.TimerHandle | None = None
        self.batches = 0  # transactions written, for the benchmark

    async def beat(self, heartbeat: Heartbeat) -> HeartbeatOutcome:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[HeartbeatOutcome] = loop.create_future()
        self._pending.append((heartbeat, done))
        if len(self._pending) >= MAX_BATCH:
            self.flush()
        elif self._timer is None:
            self._timer = loop.call_later(GROUP_COMMIT_SECONDS, self.flush)
        return await done

    def flush(self) -> None:
        """Write the pending beats now (also on stop, so no caller is left waiting)."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        batch, self._pending = self._pending, []
        if not batch:
            return
        self.batches += 1
        try:
            outcomes = self._store.heartbeat_batch([b for b, _ in batch], self._lease_seconds)
        except Exception as exc:  # each caller gets the error; the next batch tries again
            log.exception("recording %d heartbeats failed", len(batch))
            for _, done in batch:
                if not done.done():
                    done.set_exception(exc)
            return
        for (_, done), outcome in zip(batch, outcomes, strict=True):
            if not done.done():  # a caller that went away has cancelled its future
                done.set_result(outcome)
