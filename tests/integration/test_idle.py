"""An idle worker stays quiet: it samples the host only for heartbeats unless someone watches,
its when-to-contribute loop does not tick while nothing can change, and it stops promptly.

A real engine against the real pool on loopback; the host monitor and the probes are the real
ones, wrapped to count their calls.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from helpers.harness import start_pool, start_worker, wait_for
from hivemind_worker.engine.events import EngineState, MetricsSample
from hivemind_worker.engine.monitor import HostMonitor, HostSample
from hivemind_worker.engine.policy import Observation
from hivemind_worker.engine.pool_client import NodePoolClient
from hivemind_worker.engine.probes import DesktopProbes, NoProbes

pytestmark = [pytest.mark.usefixtures("memory_keyring"), pytest.mark.timeout(120)]


class CountingMonitor(HostMonitor):
    def __init__(self, work_dir: Path) -> None:
        super().__init__(work_dir)
        self.samples = 0

    def sample(self) -> HostSample:
        self.samples += 1
        return super().sample()


class CountingProbes(DesktopProbes):
    def __init__(self) -> None:
        super().__init__()
        self.observed = 0

    def observe(self) -> Observation:
        self.observed += 1
        return super().observe()


def counting_heartbeats(engine: object) -> list[int]:
    """Wrap the engine's pool client factory so that each heartbeat sent is counted."""
    sent = [0]
    make = engine._client_factory  # type: ignore[attr-defined]

    def factory(*args: object, **kwargs: object) -> NodePoolClient:
        client = make(*args, **kwargs)
        heartbeat = client.heartbeat

        async def counted(*a: object, **k: object) -> object:
            sent[0] += 1
            return await heartbeat(*a, **k)

        client.heartbeat = counted  # type: ignore[method-assign]
        return client

    engine._client_factory = factory  # type: ignore[attr-defined]
    return sent


async def test_nobody_watching_samples_only_for_heartbeats_and_watching_samples_each_second(
    tmp_path: Path,
) -> None:
    pool = await start_pool(tmp_path / "pool.db", heartbeat_interval=2)
    worker = await start_worker(tmp_path / "node-a", pool.address)
    engine = worker.engine
    monitor = CountingMonitor(engine.settings.work_dir)
    engine.monitor = monitor
    sent = counting_heartbeats(engine)
    try:
        await wait_for(lambda: engine.state is EngineState.IDLE and sent[0] >= 1, what="idle")
        # Unwatched: every host sample is a heartbeat's, and the dashboard's history gets it.
        await wait_for(lambda: sent[0] >= 4, what="three more heartbeats")
        assert monitor.samples == sent[0]
        samples = [e for e in worker.events if isinstance(e, MetricsSample)]
        assert len(samples) == sent[0]

        # Watched (the dashboard is open): once a second, between the 2 s heartbeats too,
        # and the heartbeats reuse those samples instead of taking their own.
        engine.watch_metrics(True)
        before_samples, before_beats = monitor.samples, sent[0]
        await wait_for(
            lambda: monitor.samples - before_samples >= sent[0] - before_beats + 4,
            what="one-second samples while watched",
        )

        # Unwatched again: back to one sample per heartbeat (after the next heartbeat, a
        # one-second sample that was in flight has long landed).
        engine.watch_metrics(False)
        unwatched_at = sent[0]
        await wait_for(lambda: sent[0] >= unwatched_at + 1, what="a heartbeat")
        base_samples, base_beats = monitor.samples, sent[0]
        await wait_for(lambda: sent[0] >= base_beats + 3, what="three heartbeats")
        assert monitor.samples - base_samples == sent[0] - base_beats
    finally:
        await worker.stop()
        await pool.stop()


async def test_policy_loop_sleeps_while_idle_and_looks_at_once_when_a_task_starts(
    tmp_path: Path,
) -> None:
    pool = await start_pool(tmp_path / "pool.db", heartbeat_interval=5)
    probes = CountingProbes()
    # Only rules whose probes see nothing here: the machine's own load cannot flip decisions.
    worker = await start_worker(
        tmp_path / "node-a", pool.address, probes=probes,
        other_cpu_percent=0, memory_low_percent=0,
    )  # fmt: skip
    try:
        await wait_for(lambda: worker.engine.state is EngineState.IDLE, what="idle")
        start = probes.observed
        await asyncio.sleep(8)
        # With no task a decision only gates new work: at most every IDLE_INTERVAL (10 s),
        # not once a second. (A slow machine makes fewer calls, never more.)
        assert probes.observed - start <= 2
    finally:
        await worker.stop()
        await pool.stop()


async def test_without_probes_the_policy_wakes_only_for_time_and_commands(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db", heartbeat_interval=5)
    probes = NoProbes()
    calls = [0]
    observe = probes.observe

    def counted() -> Observation:
        calls[0] += 1
        return observe()

    probes.observe = counted  # type: ignore[method-assign]
    worker = await start_worker(tmp_path / "node-a", pool.address, probes=probes)
    try:
        await wait_for(lambda: worker.engine.state is EngineState.IDLE, what="idle")
        # Connecting pokes the engine's loops; the policy may still be making the evaluation
        # that poke caused (its observation runs on a thread). Settled: a second without one.
        for _ in range(10):
            before = calls[0]
            await asyncio.sleep(1)
            if calls[0] == before:
                break
        else:
            raise AssertionError(f"the policy never stopped evaluating ({calls[0]} calls)")
        start = calls[0]
        await asyncio.sleep(3)
        assert calls[0] == start  # nothing can change a decision: no evaluation at all
        worker.engine.pause()
        worker.engine.resume()
        await wait_for(lambda: calls[0] > start, what="an evaluation after the commands")
    finally:
        await worker.stop()
        await pool.stop()


async def test_a_cancel_that_meets_a_wake_up_is_not_lost(tmp_path: Path) -> None:
    """The quit path: a wait ended by a poke in the same instant as its task is cancelled
    must end cancelled (asyncio.wait_for on 3.11 returned normally, and the loop ran on)."""
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node-a", pool.address)
    engine = worker.engine
    try:
        await wait_for(lambda: engine.state is EngineState.IDLE, what="idle")
        waiting = asyncio.create_task(engine._wait_changed(30))
        await asyncio.sleep(0.05)  # parked in the wait
        engine._poke()
        waiting.cancel()
        await asyncio.wait({waiting}, timeout=10)
        assert waiting.cancelled()
    finally:
        await worker.stop()
        await pool.stop()


async def test_shutdown_while_idle_ends_every_engine_task(tmp_path: Path) -> None:
    pool = await start_pool(tmp_path / "pool.db")
    worker = await start_worker(tmp_path / "node-a", pool.address)
    try:
        await wait_for(lambda: worker.engine.state is EngineState.IDLE, what="idle")
        worker.engine.watch_metrics(True)
        await asyncio.sleep(0.5)
        assert worker.runner is not None
        worker.engine.shutdown()
        await asyncio.wait({worker.runner}, timeout=30)
        assert worker.runner.done() and worker.runner.exception() is None
        left = {t.get_name() for t in asyncio.all_tasks() if t is not asyncio.current_task()}
        assert not left & {"metrics", "policy", "heartbeat", "poll", "watch-stop"}, left
    finally:
        await worker.stop()
        await pool.stop()
