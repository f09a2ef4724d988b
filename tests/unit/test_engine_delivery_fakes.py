"""The engine's delivery paths against fake collaborators (tests/helpers/fakes.py): a pool that
refuses results, fails in odd ways, hands a lease out twice or after its report, sends more
tasks than asked for, or cancels what this worker never had. The engine, its delivery and its
outbox (a SQLite file) are real; only the network and the sandbox are stand-ins.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers.fakes import FakePool, spec, start_fake_world
from hivemind_worker.engine import delivery
from hivemind_worker.engine.events import EngineState, ResultDelivered
from hivemind_worker.engine.pool_client import BadRequestError, RefusedSpec, StaleLeaseError
from hivemind_worker.tasks import TaskStatus


@pytest.fixture(autouse=True)
def _no_backoff(monkeypatch: pytest.MonkeyPatch) -> None:
    """Retries at once: the retry count, not the clock, is what these tests are about."""
    monkeypatch.setattr(delivery, "backoff_delay", lambda attempt, **_: 0.0)


async def test_a_result_the_pool_refuses_is_reported_once_as_failed_without_results(
    tmp_path: Path,
) -> None:
    pool = FakePool(report_errors=[BadRequestError("Request refused", "result too odd")])
    world = await start_fake_world(tmp_path, pool=pool)
    try:
        pool.hand_out(spec("t1"))
        await world.wait_until(lambda: pool.reports_for("lease-t1"), "the second report")
        await world.wait_until(
            lambda: any(isinstance(e, ResultDelivered) for e in world.events), "delivery event"
        )
        [report] = pool.reports_for("lease-t1")
        assert report.status is TaskStatus.FAILED
        assert "result refused by the pool: result too odd" in report.error
    finally:
        await world.stop()


async def test_unexpected_delivery_errors_give_up_after_the_limit(tmp_path: Path) -> None:
    limit = delivery.MAX_UNEXPECTED_DELIVERY_ERRORS
    pool = FakePool(report_errors=[RuntimeError(f"odd {i}") for i in range(limit + 5)])
    world = await start_fake_world(tmp_path, pool=pool)
    try:
        pool.hand_out(spec("t1"))
        await world.wait_until(
            lambda: any(isinstance(e, ResultDelivered) for e in world.events), "giving up"
        )
        [given_up] = [e for e in world.events if isinstance(e, ResultDelivered)]
        assert not given_up.accepted
        assert given_up.message == f"odd {limit}"  # tried exactly limit + 1 times
        assert len(pool.report_errors) == 4  # and not once more
        assert pool.reports == []
        await world.wait_until(lambda: world.engine.state is EngineState.IDLE, "idle again")
    finally:
        await world.stop()


async def test_a_lease_handed_out_twice_while_running_runs_once(tmp_path: Path) -> None:
    world = await start_fake_world(tmp_path, hold=True)
    pool = world.pool
    try:
        pool.hand_out(spec("t1"))
        await world.wait_until(lambda: world.executor.started, "the task to start")
        pool.hand_out(spec("t1"))  # the same lease again, while it runs
        await world.wait_until(lambda: len(pool.offers) >= 3, "two more polls")
        world.executor.release["t1"].set()
        await world.wait_until(lambda: pool.reports_for("lease-t1"), "the report")
        assert world.executor.started == [("t1", "lease-t1")]
        assert [r.status for r in pool.reports_for("lease-t1")] == [TaskStatus.SUCCEEDED]
    finally:
        await world.stop()


async def test_a_lease_already_reported_is_never_run_again_even_after_a_restart(
    tmp_path: Path,
) -> None:
    world = await start_fake_world(tmp_path)
    pool = world.pool
    try:
        pool.hand_out(spec("t1"))
        await world.wait_until(lambda: pool.reports_for("lease-t1"), "the first report")
        pool.hand_out(spec("t1"))  # a pool that forgot it has this lease's result
        await world.wait_until(lambda: pool.handouts.empty() and len(pool.offers) >= 3, "polls")
    finally:
        await world.stop()
    assert world.executor.started == [("t1", "lease-t1")]

    # A new engine on the same data folder remembers the lease through its outbox.
    again = await start_fake_world(tmp_path, pool=pool)
    try:
        pool.hand_out(spec("t1"), spec("t2"))
        await again.wait_until(lambda: pool.reports_for("lease-t2"), "the other task's report")
        assert again.executor.started == [("t2", "lease-t2")]
        assert len(pool.reports_for("lease-t1")) == 1
    finally:
        await again.stop()


async def test_a_reply_with_more_tasks_than_asked_for_runs_only_what_was_asked(
    tmp_path: Path,
) -> None:
    world = await start_fake_world(tmp_path, hold=True, max_concurrent_tasks=1)
    pool = world.pool
    try:
        await world.wait_until(lambda: pool.offers, "the first poll")
        assert pool.offers[0].max_tasks == 1
        pool.hand_out(*(spec(f"t{i}") for i in range(1000)))
        # Every extra goes straight back, CANCELLED with a reason, so the pool can re-queue it.
        await world.wait_until(lambda: len(pool.reports) == 999, "999 give-backs", timeout=60)
        assert world.executor.started == [("t0", "lease-t0")]
        assert {r.status for r in pool.reports} == {TaskStatus.CANCELLED}
        assert all("asked for 1 task" in r.error for r in pool.reports)
        world.executor.release["t0"].set()
        await world.wait_until(lambda: pool.reports_for("lease-t0"), "t0's report")
        assert pool.reports_for("lease-t0")[0].status is TaskStatus.SUCCEEDED
    finally:
        await world.stop()


async def test_a_cancel_for_an_unknown_task_is_ignored(tmp_path: Path) -> None:
    world = await start_fake_world(tmp_path, hold=True)
    pool = world.pool
    try:
        pool.hand_out(spec("t1"))
        await world.wait_until(lambda: world.executor.started, "the task to start")
        beats = len(pool.heartbeats)
        pool.cancel_next_heartbeat = ["no-such-task", "../../etc"]
        await world.wait_until(lambda: len(pool.heartbeats) > beats + 2, "more heartbeats")
        assert world.executor.cancelled == set()
        assert world.engine.state is EngineState.BUSY
        pool.cancel_next_heartbeat = ["t1"]  # and a real one still works
        await world.wait_until(lambda: pool.reports_for("lease-t1"), "the cancelled report")
        assert pool.reports_for("lease-t1")[0].status is TaskStatus.CANCELLED
    finally:
        await world.stop()


async def test_a_spec_that_does_not_validate_is_refused_and_a_stale_lease_dropped(
    tmp_path: Path,
) -> None:
    pool = FakePool(report_errors=[StaleLeaseError("Lease no longer valid", "expired")])
    world = await start_fake_world(tmp_path, pool=pool)
    try:
        pool.hand_out(spec("t1"))  # its report meets a stale lease: dropped, not retried
        await world.wait_until(
            lambda: any(isinstance(e, ResultDelivered) for e in world.events), "the drop"
        )
        assert pool.reports == []
        pool.hand_out(RefusedSpec("bad", "lease-bad", "image: not a valid reference"))
        await world.wait_until(lambda: pool.reports_for("lease-bad"), "the refusal")
        refused = pool.reports_for("lease-bad")[0]
        assert refused.status is TaskStatus.REJECTED
        assert refused.error == "image: not a valid reference"
        assert ("bad", "lease-bad") not in world.executor.started
    finally:
        await world.stop()
