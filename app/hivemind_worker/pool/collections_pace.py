"""Full garbage collections at a bounded rate, instead of whenever CPython's heuristic decides.

With 10,000 workers the pool holds a parked long-poll per worker: its gRPC call, coroutine,
future and timer, replaced about every 30 s. Each replacement is promoted to the oldest
generation before it ends, so CPython's rule (a full collection once the objects promoted
since the last one reach a quarter of the old generation) ran a full collection every 5-20 s,
each stopping the event loop for 0.5-0.6 s over the whole heap: every call arriving then
waited. Measured in bench/pool_scale.py with a gc callback: the heartbeats slower than
100 ms (7 % of them at 10,000 workers) fell in exactly those pauses (docs/benchmarks.md).

So while the pool serves: what was allocated before serving (imports, the store) is frozen
out of the collector's sight (`gc.freeze`), the oldest generation is not collected
automatically, and the reaper runs a full collection itself every `every` seconds (default
300: a 0.6 s pause every 5 min is 0.2 % of the time, against 3-10 % before). The young
generations are still collected as usual, which is where most cycles die; reference
counting frees everything else at once. Cyclic garbage that reaches the oldest generation
waits at most `every` seconds. `stop` puts CPython's thresholds back.
"""

from __future__ import annotations

import gc
import logging
import time

log = logging.getLogger("hivemind_worker.pool")

NEVER = 1_000_000_000  # a gen-2 threshold no run reaches: only our own full collections


# Process-wide, as the collector is: the first pool to start takes it over, the last to stop
# gives it back (tests run several pools in one process).
class _Collector:
    holders = 0
    saved: tuple[int, int, int] | None = None


_collector = _Collector()


class FullCollections:
    def __init__(self, every: float) -> None:
        self.every = every
        self._holding = False
        self._last = time.monotonic()
        self.runs = 0
        self.longest = 0.0  # seconds, for the benchmark

    def start(self) -> None:
        """Take over the oldest generation's collections (every <= 0: leave CPython's rule)."""
        if self.every <= 0 or self._holding:
            return
        if _collector.holders == 0:
            gc.freeze()  # no collection first: a start stays quick in a large process
            saved = _collector.saved = gc.get_threshold()
            gc.set_threshold(saved[0], saved[1], NEVER)
        _collector.holders += 1
        self._holding = True
        self._last = time.monotonic()

    def maybe_collect(self) -> None:
        """From the reaper, once a pass: a full collection when `every` seconds have passed."""
        if not self._holding or time.monotonic() - self._last < self.every:
            return
        started = time.perf_counter()
        found = gc.collect()
        took = time.perf_counter() - started
        self._last = time.monotonic()
        self.runs += 1
        self.longest = max(self.longest, took)
        log.debug("full garbage collection: %d unreachable, %.3f s", found, took)

    def stop(self) -> None:
        if not self._holding:
            return
        self._holding = False
        _collector.holders -= 1
        if _collector.holders == 0 and _collector.saved is not None:
            gc.set_threshold(*_collector.saved)
            gc.unfreeze()
            _collector.saved = None
