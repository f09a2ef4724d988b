"""Heartbeats in memory: answered without a write, written in one transaction per flush.

And the token cache the same calls go through, which must still see a revocation."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from hivemind_worker.pool.heartbeats import Liveness
from hivemind_worker.pool.records import Heartbeat
from hivemind_worker.pool.store import PoolStore
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import GiB, Resources, TaskSpec, TaskStatus

BIG = Resources(8, 8 * GiB, 100 * GiB, 0)


def _store(tmp_path: Path, nodes: int) -> PoolStore:
    store = PoolStore(tmp_path / "pool.db")
    store.add_user("alice", "pw")
    for n in range(nodes):
        store.upsert_node(f"n{n}", "alice", pb.RegisterNodeRequest(node_id=f"n{n}"), ["process"])
    return store


def _submit(store: PoolStore) -> str:
    task = TaskSpec.from_proto(pb.TaskSpec(kind=pb.TASK_KIND_PYTHON, source="1"), require_id=False)
    return store.submit(task, "alice")


def test_beats_are_answered_without_writing_and_one_flush_writes_them_all(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path, 100)
    task_id = _submit(store)
    (spec,) = store.lease_tasks("n7", BIG, 1, ["process"], lease_seconds=1)
    store.request_cancel(task_id, "alice")
    expires_before = store.get_task(task_id).lease_expires_ms  # type: ignore[union-attr]
    liveness = Liveness(store, lease_seconds=lambda: 600)
    writes = store.write_transactions

    usage = {spec.lease_id: {"cpu_seconds": 4.0}}
    outcomes = [
        liveness.beat(
            Heartbeat(
                f"n{n}",
                pb.NODE_STATUS_BUSY,
                {"cpu_percent": float(n)},
                [spec.lease_id] if n == 7 else ["gone"],
                usage if n == 7 else {},
            )
        )
        for n in range(100)
    ]

    assert store.write_transactions == writes  # answered from reads alone
    assert outcomes[7].lost == [] and outcomes[7].cancels == [task_id]
    assert all(o.lost == ["gone"] and o.cancels == [] for i, o in enumerate(outcomes) if i != 7)
    assert store.get_task(task_id).lease_expires_ms == expires_before  # type: ignore[union-attr]

    liveness.flush()
    assert store.write_transactions - writes == 1 and liveness.flushes == 1
    after = store.get_task(task_id)
    assert after is not None and after.lease_expires_ms > expires_before  # renewed, written
    assert after.usage == {"cpu_seconds": 4.0}
    node = store.get_node("n42", "alice")
    assert node.status == pb.NODE_STATUS_BUSY and node.last_seen_ms > 0
    assert store.counters()["heartbeats"] == 100
    liveness.flush()  # nothing new: no transaction
    assert store.write_transactions - writes == 1
    store.close()


def test_a_renewal_never_shortens_a_lease_nor_touches_a_reported_one(tmp_path: Path) -> None:
    store = _store(tmp_path, 1)
    _submit(store)
    _submit(store)
    kept, done = store.lease_tasks("n0", BIG, 2, ["process"], lease_seconds=3600)
    liveness = Liveness(store, lease_seconds=lambda: 1)  # would end both leases sooner
    assert liveness.beat(Heartbeat("n0", 1, {}, [kept.lease_id, done.lease_id])).lost == []
    store.record_report(
        node_id="n0", task_id=done.task_id, lease_id=done.lease_id, status=TaskStatus.SUCCEEDED
    )
    before = store.get_task(kept.task_id).lease_expires_ms  # type: ignore[union-attr]
    liveness.flush()
    assert store.get_task(kept.task_id).lease_expires_ms == before  # type: ignore[union-attr]
    reported = store.get_task(done.task_id)
    assert reported is not None and reported.status is TaskStatus.SUCCEEDED
    assert reported.lease_expires_ms == 0  # the late renewal did not revive it
    # A reported lease is neither renewed nor lost for the worker that reported it.
    assert liveness.beat(Heartbeat("n0", 1, {}, [done.lease_id])).lost == []
    store.close()


def test_a_failed_flush_keeps_what_was_noted_for_the_next(tmp_path: Path) -> None:
    store = _store(tmp_path, 2)
    _submit(store)
    (spec,) = store.lease_tasks("n0", BIG, 1, ["process"], lease_seconds=1)
    before = store.get_task(spec.task_id).lease_expires_ms  # type: ignore[union-attr]
    liveness = Liveness(store, lease_seconds=lambda: 600)
    liveness.beat(Heartbeat("n0", 1, {}, [spec.lease_id]))
    liveness.beat(Heartbeat("n1", 1, {}))

    # Another connection holds the write lock: the flush cannot write, and says so.
    store._db.execute("PRAGMA busy_timeout=50")
    other = sqlite3.connect(tmp_path / "pool.db", isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        liveness.flush()
    assert liveness.pending == 3  # two nodes and one lease, none dropped
    other.execute("ROLLBACK")
    other.close()

    liveness.flush()
    assert liveness.pending == 0
    assert store.get_task(spec.task_id).lease_expires_ms > before  # type: ignore[union-attr]
    assert store.counters()["heartbeats"] == 2
    store.close()


def test_a_token_revoked_by_another_process_is_refused_within_the_recheck(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path, 0)
    token, _ = store.issue_token("alice", 3600)
    assert store.token_user(token) == "alice"  # verified once, then served from memory
    other = PoolStore(tmp_path / "pool.db")  # `hivemind-pool add-user`, in its own process
    other.add_user("alice", "new password")
    other.close()
    deadline = time.monotonic() + 10  # a hang guard: the cache rechecks every second
    while store.token_user(token) is not None:
        assert time.monotonic() < deadline, "the revoked token was still accepted"
        time.sleep(0.05)
    store.close()


def test_a_node_changed_by_another_process_is_read_again_within_the_recheck(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path, 1)
    assert store.node_capabilities("n0", "alice") == {"process"}  # read once, then kept
    other = PoolStore(tmp_path / "pool.db")
    other.upsert_node("n0", "alice", pb.RegisterNodeRequest(node_id="n0"), ["docker"])
    other.close()
    deadline = time.monotonic() + 10  # a hang guard: the cache rechecks every second
    while store.node_capabilities("n0", "alice") != {"docker"}:
        assert time.monotonic() < deadline, "the node's old capabilities were still used"
        time.sleep(0.05)
    store.close()
