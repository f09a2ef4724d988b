"""Heartbeats kept in memory and written in batches: a beat is answered at once, flushed per pass.

A heartbeat used to write its node's liveness and lease renewals in a (group-committed)
transaction and wait for the commit. Profiling the pool under 10,000 simulated workers
(bench/pool_scale.py) showed the heartbeat handler's 2.3 ms were mostly that wait (the 2 ms
group-commit window), plus a transaction per few beats, a future and a timer per beat and a
second step of the handler's coroutine. Now a beat reads what it must answer (its leases the
pool no longer honours, the node's cancels: indexed reads, no write), notes the node's
liveness and its renewals here, and is answered. The reaper writes everything noted in one
transaction at the start of each pass (every second), before it looks for expired leases, so
a renewal noted here is never missed by the reaper.

What a crash of the pool process loses: the liveness and renewals noted since the last pass
(at most `reaper_interval`). Nothing depends on them after a restart: on start the pool gives
every running lease a full `lease_timeout` to reconnect (`extend_running_leases`), longer
than any renewal that was lost. So a worker that keeps heartbeating keeps its leases across a
crash and restart; one that stopped loses them a `lease_timeout` after the restart at the
latest (docs/pool.md, "What a crash loses").
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from hivemind_worker.pool.interface import TaskStore
from hivemind_worker.pool.records import (
    Heartbeat,
    HeartbeatOutcome,
    LivenessRow,
    RenewalRow,
    now_ms,
)

log = logging.getLogger("hivemind_worker.pool")


@dataclass(frozen=True)
class Renewal:
    """A lease renewed in memory, not written yet."""

    node_id: str
    expires_ms: int
    usage: dict[str, float] | None  # the last usage a heartbeat sent for the lease


class Liveness:
    """The nodes' last heartbeats and the leases they renewed, until the next flush."""

    def __init__(self, store: TaskStore, lease_seconds: Callable[[], float]) -> None:
        self._store = store
        self._lease_seconds = lease_seconds  # the pace's, at each beat (pace.py)
        self._nodes: dict[str, tuple[Heartbeat, int]] = {}  # node id -> last beat, its time
        self._renewals: dict[str, Renewal] = {}  # lease id -> its renewal
        self._beats = 0  # since the last flush, for the store's lifetime counter
        self.flushes = 0  # transactions written, for the benchmark

    def beat(self, heartbeat: Heartbeat, now: int | None = None) -> HeartbeatOutcome:
        """Note the beat and renew the leases it lists that are current; answer at once."""
        now = now if now is not None else now_ms()
        outcome = self._store.check_heartbeat(heartbeat.node_id, heartbeat.lease_ids)
        self._nodes[heartbeat.node_id] = (heartbeat, now)
        expires = now + int(self._lease_seconds() * 1000)
        lost = outcome.lost
        for lease_id in heartbeat.lease_ids:
            if lease_id in lost:
                continue
            usage = heartbeat.usage.get(lease_id)
            if usage is None and (prev := self._renewals.get(lease_id)) is not None:
                usage = prev.usage
            self._renewals[lease_id] = Renewal(heartbeat.node_id, expires, usage)
        self._beats += 1
        return outcome

    def renewal(self, lease_id: str) -> Renewal | None:
        """The lease's renewal noted and not written yet, if any."""
        return self._renewals.get(lease_id)

    def forget(self, lease_id: str) -> None:
        """Drop the lease's pending renewal: it was reported, so there is nothing to renew."""
        self._renewals.pop(lease_id, None)

    @property
    def pending(self) -> int:
        """Nodes and leases noted and not written yet."""
        return len(self._nodes) + len(self._renewals)

    def flush(self) -> None:
        """Write what was noted since the last flush in one transaction.

        On failure nothing noted is dropped: it is written by the next flush (a newer beat
        for the same node or lease wins), and the error goes to the caller.
        """
        if not (self._nodes or self._renewals or self._beats):
            return
        nodes, self._nodes = self._nodes, {}
        renewals, self._renewals = self._renewals, {}
        beats, self._beats = self._beats, 0
        try:
            self._store.record_liveness(
                [LivenessRow.of(beat, seen) for beat, seen in nodes.values()],
                [
                    RenewalRow(lease_id, r.node_id, r.expires_ms, r.usage)
                    for lease_id, r in renewals.items()
                ],
                beats,
            )
        except Exception:
            for node_id, noted in nodes.items():
                self._nodes.setdefault(node_id, noted)
            for lease_id, renewal in renewals.items():
                self._renewals.setdefault(lease_id, renewal)
            self._beats += beats
            raise
        self.flushes += 1
