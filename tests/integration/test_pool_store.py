"""The pool's SQLite store on a real file: leasing, expiry, reports, results, persistence."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from hivemind_worker.pool.store import (
    PoolStore,
    ResultMismatch,
    StaleLease,
    TokenExpired,
    now_ms,
)
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import MiB, Resources, TaskSpec, TaskStatus

pytestmark = pytest.mark.timeout(60)

BIG = Resources(cpus=64, memory_bytes=1 << 40, disk_bytes=1 << 40, gpus=0)


def py_task(task_id: str = "", memory_mb: int = 0) -> TaskSpec:
    msg = pb.TaskSpec(
        task_id=task_id,
        kind=pb.TASK_KIND_PYTHON,
        source="print('hi')",
        resources=pb.Resources(memory_bytes=memory_mb * MiB),
    )
    return TaskSpec.from_proto(msg, require_id=False)


@pytest.fixture
def pool_store(tmp_path: Path) -> PoolStore:
    store = PoolStore(tmp_path / "pool.db")
    store.add_user("alice", "pw")
    return store


def test_users_and_tokens(pool_store: PoolStore) -> None:
    assert pool_store.check_password("alice", "pw")
    assert not pool_store.check_password("alice", "nope")
    assert not pool_store.check_password("bob", "pw")
    token, expires = pool_store.issue_token("alice", 60)
    assert pool_store.token_user(token) == "alice"
    assert pool_store.token_user("garbage") is None
    with pytest.raises(TokenExpired):
        pool_store.token_user(token, now=expires)
    # A new password revokes the sessions.
    assert pool_store.add_user("alice", "pw2") is False
    assert pool_store.token_user(token) is None
    assert pool_store.check_password("alice", "pw2")


def test_lease_fifo_fit_and_capabilities(pool_store: PoolStore) -> None:
    ids = [pool_store.submit(py_task(memory_mb=512), "alice", now=1000 + i) for i in range(3)]
    assert all(len(i) == 32 for i in ids)
    free = Resources(cpus=4, memory_bytes=1024 * MiB, disk_bytes=10 << 30)
    assert pool_store.lease_tasks("n1", free, 10, ["gpu"], lease_seconds=60) == []
    leased = pool_store.lease_tasks("n1", free, 10, ["process"], lease_seconds=60)
    assert [s.task_id for s in leased] == ids[:2]
    assert all(s.lease_id and s.attempt == 1 for s in leased)
    task = pool_store.get_task(ids[2])
    assert task is not None
    assert task.status is TaskStatus.QUEUED


def test_expiry_requeues_then_fails(pool_store: PoolStore) -> None:
    tid = pool_store.submit(py_task(), "alice")
    for attempt in (1, 2, 3):
        (spec,) = pool_store.lease_tasks("n1", BIG, 1, ["process"], lease_seconds=0)
        assert spec.attempt == attempt
        out = pool_store.expire_leases(now=now_ms() + 1)
        with pytest.raises(StaleLease):
            pool_store.record_report(
                node_id="n1", task_id=tid, lease_id=spec.lease_id, status=TaskStatus.SUCCEEDED
            )
    assert out.failed == [tid]
    task = pool_store.get_task(tid)
    assert task is not None
    assert task.status is TaskStatus.FAILED
    assert task.error == "lease expired 3 times; last on node n1"


def test_report_idempotent_and_result(pool_store: PoolStore) -> None:
    tid = pool_store.submit(py_task(), "alice")
    (spec,) = pool_store.lease_tasks("n1", BIG, 1, ["process"], lease_seconds=60)
    data = b"x" * (3 * MiB // 2)
    sha = hashlib.sha256(data).hexdigest()
    with pytest.raises(ResultMismatch):
        pool_store.record_report(
            node_id="n1",
            task_id=tid,
            lease_id=spec.lease_id,
            status=TaskStatus.SUCCEEDED,
            result_sha256=sha,
            result_size=len(data),
        )
    pool_store.store_result(
        tid, spec.lease_id, "n1", sha256=sha, size=len(data), chunks=[data[:MiB], data[MiB:]]
    )
    for _ in range(2):
        out = pool_store.record_report(
            node_id="n1",
            task_id=tid,
            lease_id=spec.lease_id,
            status=TaskStatus.SUCCEEDED,
            result_sha256=sha,
            result_size=len(data),
        )
        assert out.recorded is TaskStatus.SUCCEEDED
    assert pool_store.result_bytes(tid) == data
    assert pool_store.counters()["reports"] == 1


def test_cancel_wins_and_worker_give_back(pool_store: PoolStore) -> None:
    t1 = pool_store.submit(py_task("t1"), "alice")
    t2 = pool_store.submit(py_task("t2"), "alice")
    s1, s2 = pool_store.lease_tasks("n1", BIG, 2, ["process"], lease_seconds=60)
    assert pool_store.request_cancel(t1, "bob") is None
    assert pool_store.request_cancel(t1, "alice") is TaskStatus.RUNNING
    assert pool_store.cancels_for("n1") == [t1]
    out = pool_store.record_report(
        node_id="n1", task_id=t1, lease_id=s1.lease_id, status=TaskStatus.SUCCEEDED
    )
    assert out.recorded is TaskStatus.CANCELLED
    # CANCELLED that nobody asked for: the worker gave the task back.
    out = pool_store.record_report(
        node_id="n1", task_id=t2, lease_id=s2.lease_id, status=TaskStatus.CANCELLED
    )
    assert out.requeued and out.recorded is TaskStatus.QUEUED
    task = pool_store.get_task(t2)
    assert task is not None
    assert (task.status, task.attempt) == (TaskStatus.QUEUED, 2)


def test_state_survives_reopen(tmp_path: Path) -> None:
    store = PoolStore(tmp_path / "pool.db")
    store.add_user("alice", "pw")
    token, _ = store.issue_token("alice", 60)
    tid = store.submit(py_task(), "alice")
    (spec,) = store.lease_tasks("n1", BIG, 1, ["process"], lease_seconds=60)
    before = store.get_task(tid)
    store.close()

    again = PoolStore(tmp_path / "pool.db")
    assert again.token_user(token) == "alice"
    after = again.get_task(tid)
    assert after == before
    assert again.renew("n1", [spec.lease_id, "gone"], 60) == ["gone"]


def _garbage(store: PoolStore) -> tuple[int, int]:
    """(blobs queued for collection, chunks stored in all)."""
    queued = store._db.execute("SELECT count(*) FROM garbage_blobs").fetchone()[0]
    chunks = store._db.execute("SELECT count(*) FROM blob_chunks").fetchone()[0]
    return int(queued), int(chunks)


def test_results_are_swapped_in_and_freed_in_batches(tmp_path: Path) -> None:
    store = PoolStore(tmp_path / "pool.db")
    store.add_user("alice", "pw")
    tid = store.submit(py_task(), "alice")
    (spec,) = store.lease_tasks("n1", BIG, 1, ["process"], lease_seconds=60)
    first = b"1" * (3 * MiB)
    store.store_result(
        tid,
        spec.lease_id,
        "n1",
        sha256=hashlib.sha256(first).hexdigest(),
        size=len(first),
        chunks=[first[i : i + MiB] for i in range(0, len(first), MiB)],
    )
    assert _garbage(store) == (0, 3)

    # A second upload for the lease replaces the first, whose chunks are freed a few at a time.
    second = b"2" * MiB
    sha = hashlib.sha256(second).hexdigest()
    blob = store.new_blob()
    store.add_blob_chunk(blob, 0, second)
    assert store.commit_result(
        tid, spec.lease_id, "n1", sha256=sha, size=len(second), blob_id=blob, chunks=1
    )
    assert _garbage(store) == (1, 4)
    assert store.collect_garbage(max_chunks=2) == 2
    assert _garbage(store) == (1, 2)
    assert store.collect_garbage(max_chunks=2) == 1
    assert _garbage(store) == (0, 1)
    assert store.collect_garbage() == 0

    # A commit for a lease that is no longer current is refused and its blob discarded.
    stale = store.new_blob()
    store.add_blob_chunk(stale, 0, b"late")
    with pytest.raises(StaleLease):
        store.commit_result(tid, "other-lease", "n1", sha256=sha, size=4, blob_id=stale, chunks=1)
    assert _garbage(store) == (1, 2)
    store.collect_garbage()

    # Chunks a crash left half written are found on open and freed.
    orphan = store.new_blob()
    store.add_blob_chunk(orphan, 0, b"crash")
    store.close()
    store = PoolStore(tmp_path / "pool.db")
    assert _garbage(store) == (1, 2)
    store.collect_garbage()
    assert _garbage(store) == (0, 1)

    store.record_report(
        node_id="n1",
        task_id=tid,
        lease_id=spec.lease_id,
        status=TaskStatus.SUCCEEDED,
        result_sha256=sha,
        result_size=len(second),
    )
    assert store.result_bytes(tid) == second
    store.close()


def test_migrates_a_version_1_database(tmp_path: Path) -> None:
    path = tmp_path / "pool.db"
    store = PoolStore(path)
    store.add_user("alice", "pw")
    tid = store.submit(py_task(), "alice")
    (spec,) = store.lease_tasks("n1", BIG, 1, ["process"], lease_seconds=60)
    data = b"v1 result " * (MiB // 5)
    sha = hashlib.sha256(data).hexdigest()
    store.store_result(
        tid, spec.lease_id, "n1", sha256=sha, size=len(data), chunks=[data[:MiB], data[MiB:]]
    )
    store.record_report(
        node_id="n1",
        task_id=tid,
        lease_id=spec.lease_id,
        status=TaskStatus.SUCCEEDED,
        result_sha256=sha,
        result_size=len(data),
    )
    # Turn the file back into what version 1 wrote: chunks in result_chunks by task id.
    db = store._db
    db.executescript(
        """
        BEGIN;
        CREATE TABLE result_chunks (
            task_id TEXT NOT NULL REFERENCES results(task_id) ON DELETE CASCADE,
            seq     INTEGER NOT NULL,
            data    BLOB NOT NULL,
            PRIMARY KEY (task_id, seq)
        );
        INSERT INTO result_chunks(task_id, seq, data)
            SELECT r.task_id, c.seq, c.data FROM results r JOIN blob_chunks c USING (blob_id);
        DROP TRIGGER results_free_on_delete;
        DROP TRIGGER results_free_on_replace;
        DROP TABLE blob_chunks;
        DROP TABLE garbage_blobs;
        ALTER TABLE results DROP COLUMN blob_id;
        DROP INDEX tasks_running_by_expiry;
        DROP INDEX tasks_cancels_by_node;
        DROP INDEX tokens_by_expiry;
        DROP TABLE task_exclusions;
        PRAGMA user_version = 1;
        COMMIT;
        """
    )
    store.close()

    migrated = PoolStore(path)
    assert int(migrated._db.execute("PRAGMA user_version").fetchone()[0]) == 4
    assert migrated.result_bytes(tid) == data
    assert _garbage(migrated) == (0, 2)
    migrated.close()


def test_a_task_cancelled_by_the_person_on_a_node_never_returns_to_that_node(
    pool_store: PoolStore,
) -> None:
    task_id = pool_store.submit(py_task(), "alice")

    def lease(node: str) -> list[pb.TaskSpec]:
        return pool_store.lease_tasks(node, BIG, 4, ["process"], lease_seconds=60)

    (first,) = lease("n1")
    outcome = pool_store.record_report(
        node_id="n1",
        task_id=task_id,
        lease_id=first.lease_id,
        status=TaskStatus.CANCELLED,
        exclude_node=True,
    )
    assert outcome.requeued  # back in the queue for everyone else
    assert lease("n1") == []
    (second,) = lease("n2")
    assert second.task_id == task_id and second.attempt == 2
