"""Every statement on the pool's hot paths finds its rows through an index (EXPLAIN QUERY PLAN)."""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from hivemind_worker.pool.records import Heartbeat, LivenessRow, RenewalRow
from hivemind_worker.pool.store import PoolStore
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import GiB, Resources, TaskSpec, TaskStatus

BIG = Resources(8, 8 * GiB, 100 * GiB, 0)


def _task(n: int) -> TaskSpec:
    msg = pb.TaskSpec(kind=pb.TASK_KIND_PYTHON, source=f"print({n})")
    return TaskSpec.from_proto(msg, require_id=False)


def _plan(store: PoolStore, sql: str) -> list[str]:
    rows = store._db.execute(f"EXPLAIN QUERY PLAN {sql}").fetchall()
    return [str(r["detail"]) for r in rows]


def test_hot_path_statements_use_indexes_not_scans(tmp_path: Path) -> None:
    store = PoolStore(tmp_path / "pool.db")
    store.add_user("alice", "pw")
    for n in range(3):
        store.upsert_node(f"n{n}", "alice", pb.RegisterNodeRequest(node_id=f"n{n}"), ["process"])
    # Some history, so the tables are not trivially empty.
    for n in range(200):
        store.submit(_task(n), "alice")
    for spec in store.lease_tasks(
        "n0", Resources(1000, 1000 * GiB, 10_000 * GiB, 0), 150, ["process"], lease_seconds=60
    ):
        store.record_report(
            node_id="n0", task_id=spec.task_id, lease_id=spec.lease_id, status=TaskStatus.SUCCEEDED
        )

    seen: list[str] = []
    store._db.set_trace_callback(seen.append)  # the statements as run, with their values
    # What a worker's life runs, over and over: login token checks, a node look-up, leases,
    # heartbeats that renew them, a report, the reaper's pass, a submit and a cancel.
    token, _ = store.issue_token("alice", 3600)
    store.token_user(token)
    store.get_node("n1", "alice")
    task_id = store.submit(_task(1000), "alice")
    (spec,) = store.lease_tasks("n1", BIG, 1, ["process"], lease_seconds=60)
    store.check_heartbeat("n1", [spec.lease_id, "unknown-lease"])
    store.record_liveness(
        [
            LivenessRow.of(Heartbeat("n1", 1, {"cpu_percent": 1.0}), 1),
            LivenessRow("n2", 1, 1, "{}"),
        ],
        [RenewalRow(spec.lease_id, "n1", 10**13, {"cpu_seconds": 1.0})],
        2,
    )
    store.renew("n1", ["unknown-lease"], 60)
    store.request_cancel(task_id, "alice")
    store.cancels_for("n1")
    store.expire_leases()
    sha = hashlib.sha256(b"x").hexdigest()
    store.store_result(spec.task_id, spec.lease_id, "n1", sha256=sha, size=1, chunks=[b"x"])
    store.record_report(
        node_id="n1",
        task_id=spec.task_id,
        lease_id=spec.lease_id,
        status=TaskStatus.CANCELLED,
        result_sha256=sha,
        result_size=1,
    )
    store.task_need(task_id)
    store._db.set_trace_callback(None)

    statements = [s for s in seen if re.match(r"\s*(SELECT|UPDATE|DELETE)", s)]
    assert len(statements) >= 15
    tables = {"tasks", "nodes", "tokens", "reports", "results", "blob_chunks", "users"}
    for sql in statements:
        for detail in _plan(store, sql):
            # "SCAN t" reads a whole table (or index); "SEARCH t USING ..." goes to its rows.
            scan = re.match(r"SCAN (\w+)", detail)
            assert not (scan and scan.group(1) in tables), f"{detail!r} for: {sql}"
            assert "TEMP B-TREE" not in detail, f"{detail!r} for: {sql}"

    # And the indexes made for the hot paths are the ones chosen.
    reaper = next(s for s in statements if "lease_expires_ms <=" in s)
    assert any("tasks_running_by_expiry" in d for d in _plan(store, reaper))
    cancels = next(s for s in statements if "cancel_requested = 1" in s)
    assert any("tasks_cancels_by_node" in d for d in _plan(store, cancels))
    lease = next(s for s in statements if s.startswith("SELECT task_id, spec"))
    assert any("tasks_by_status" in d for d in _plan(store, lease))
    store.close()
