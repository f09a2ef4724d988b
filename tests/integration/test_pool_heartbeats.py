"""Group commit: heartbeats that arrive together are recorded in one transaction, each answered."""

from __future__ import annotations

import asyncio
from pathlib import Path

from hivemind_worker.pool.heartbeats import MAX_BATCH, HeartbeatBatcher
from hivemind_worker.pool.records import Heartbeat
from hivemind_worker.pool.store import PoolStore
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import GiB, Resources, TaskSpec

BIG = Resources(8, 8 * GiB, 100 * GiB, 0)


def _store(tmp_path: Path, nodes: int) -> PoolStore:
    store = PoolStore(tmp_path / "pool.db")
    store.add_user("alice", "pw")
    for n in range(nodes):
        store.upsert_node(f"n{n}", "alice", pb.RegisterNodeRequest(node_id=f"n{n}"), ["process"])
    return store


async def test_beats_that_arrive_together_share_one_transaction(tmp_path: Path) -> None:
    store = _store(tmp_path, 100)
    task = TaskSpec.from_proto(pb.TaskSpec(kind=pb.TASK_KIND_PYTHON, source="1"), require_id=False)
    task_id = store.submit(task, "alice")
    (spec,) = store.lease_tasks("n7", BIG, 1, ["process"], lease_seconds=1)
    store.request_cancel(task_id, "alice")
    expires_before = store.get_task(task_id).lease_expires_ms  # type: ignore[union-attr]
    batcher = HeartbeatBatcher(store, lease_seconds=600)
    writes = store.write_transactions

    beats = [
        Heartbeat(f"n{n}", 1, {"cpu_percent": float(n)}, [spec.lease_id] if n == 7 else ["gone"])
        for n in range(100)
    ]
    outcomes = await asyncio.gather(*(batcher.beat(b) for b in beats))

    assert store.write_transactions - writes == 1 and batcher.batches == 1
    assert outcomes[7].lost == [] and outcomes[7].cancels == [task_id]
    assert all(o.lost == ["gone"] and o.cancels == [] for i, o in enumerate(outcomes) if i != 7)
    after = store.get_task(task_id)
    assert after is not None and after.lease_expires_ms > expires_before  # renewed, committed
    assert store.counters()["heartbeats"] == 100
    store.close()


async def test_a_full_batch_is_written_at_once_and_a_caller_that_left_is_skipped(
    tmp_path: Path,
) -> None:
    store = _store(tmp_path, 1)
    batcher = HeartbeatBatcher(store, lease_seconds=60)
    waiting = [asyncio.ensure_future(batcher.beat(Heartbeat("n0", 1, {}))) for _ in range(3)]
    await asyncio.sleep(0)  # all three are queued behind the group-commit timer
    waiting[1].cancel()
    full = [asyncio.ensure_future(batcher.beat(Heartbeat("n0", 1, {}))) for _ in range(MAX_BATCH)]
    await asyncio.gather(*full, waiting[0], waiting[2])
    assert waiting[1].cancelled()
    # MAX_BATCH beats filled the first batch, written at once; the last 3 made a second.
    assert batcher.batches == 2
    assert store.counters()["heartbeats"] == MAX_BATCH + 3  # recorded; only the answer is lost
    store.close()
