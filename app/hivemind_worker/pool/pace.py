"""How often workers heartbeat, set by how many there are: the pool's heartbeat rate is bounded.

Every worker heartbeats at the interval the pool gives it. At a fixed interval the pool's
heartbeat load grows with the fleet: 10,000 workers at 10 s are 1,000 calls a second, which
on a small machine is more than one Python gRPC process takes up promptly (docs/benchmarks.md:
a bare grpc.aio server that only answers misses a 100 ms p99 there). So, as Nomad's servers
do with `max_heartbeats_per_second`, the interval stretches with the number of live workers
to keep the rate at or under `max_heartbeats_per_second`, and never goes below the
configured interval. The lease timeout stretches with it in the configured proportion (60 s
for 10 s by default: a lease survives five lost beats at any size), so a live worker never
loses its leases to the longer interval.

The cost, said in docs/pool.md: at 10,000 workers with the default 100 beats a second, a beat
every 100 s, so a cancel reaches a running task within 100 s rather than 10 s, and a dead
worker's tasks run elsewhere after 600 s rather than 60 s.

Workers learn the interval at registration and from every heartbeat reply, so a growing
fleet slows its beats within one interval. Workers that do not know the reply's fields keep
their registration's interval; the pool honours their leases all the same (the lease timeout
only grows).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Live workers: seen (registered or beat) within this many of the current intervals.
LIVE_INTERVALS = 2.5
# How long a count taken from the database at start stands in for the workers not seen yet
# since (each reconnects within its interval; 1 h covers any interval below 360,000 workers).
SEEDED_FOR_MS = 3600 * 1000


@dataclass(frozen=True)
class Pace:
    heartbeat_interval: int  # seconds between a worker's heartbeats
    lease_timeout: int  # seconds a lease stays valid without a renewal


def pace_for(
    live_workers: int, heartbeat_interval: int, lease_timeout: int, max_per_second: float
) -> Pace:
    """The pace for `live_workers`: the configured one, slowed to keep the heartbeat rate at
    or under `max_per_second` (0: never slowed)."""
    if max_per_second <= 0 or live_workers <= heartbeat_interval * max_per_second:
        return Pace(heartbeat_interval, lease_timeout)
    interval = math.ceil(live_workers / max_per_second)
    lease = max(lease_timeout, math.ceil(interval * lease_timeout / heartbeat_interval))
    return Pace(interval, lease)


class Pacer:
    """Counts live workers from what they send and gives the pace for that many."""

    def __init__(self, heartbeat_interval: int, lease_timeout: int, max_per_second: float) -> None:
        self._base = (heartbeat_interval, lease_timeout, max_per_second)
        self._seen: dict[str, int] = {}  # node id -> last registration or beat (ms)
        self._seeded = 0  # workers known alive from the database at start
        self._seeded_until = 0
        self._next_prune = 0
        self.pace = Pace(heartbeat_interval, lease_timeout)

    def seed(self, workers: int, now: int) -> None:
        """At start: `workers` were alive before the pool stopped; count them until they have
        had time to come back (their interval is the one the pool gave them then)."""
        self._seeded = workers
        self._seeded_until = now + SEEDED_FOR_MS
        self._update(now)

    def seen(self, node_id: str, now: int) -> None:
        """A worker registered or beat: it is live. Cheap: a dict write, a recount at times."""
        self._seen[node_id] = now
        if now >= self._next_prune:
            self._update(now)

    def _update(self, now: int) -> None:
        """Forget workers silent for LIVE_INTERVALS intervals; take the pace for the rest.

        Run at most once a second (a pass over every known worker: ~1 ms at 10,000)."""
        horizon = now - int(LIVE_INTERVALS * self.pace.heartbeat_interval * 1000)
        self._seen = {n: t for n, t in self._seen.items() if t >= horizon}
        live = len(self._seen)
        if now < self._seeded_until:
            live = max(live, self._seeded)
        self.pace = pace_for(live, *self._base)
        self._next_prune = now + 1000

    @property
    def live(self) -> int:
        return len(self._seen)
