"""The reference pool's SQLite store: users, tokens, nodes, tasks, leases and reports."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path

from google.protobuf import json_format

from hivemind_worker.pool.leases import LeaseStore
from hivemind_worker.pool.records import (
    KIND_CAPABILITIES,
    MAX_ERROR_CHARS,
    MAX_LOG_TAIL_BYTES,
    DuplicateTask,
    ExpiryOutcome,
    Heartbeat,
    HeartbeatOutcome,
    NodeNotFound,
    NodeOwnedByOther,
    NodeRecord,
    ReportOutcome,
    ResultInfo,
    ResultMismatch,
    StaleLease,
    StoreError,
    TaskNeed,
    TaskRecord,
    TokenExpired,
    _task_record,
    hash_password,
    now_ms,
    verify_password,
)
from hivemind_worker.pool.schema import SCHEMA_VERSION
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.task_params import required_capability
from hivemind_worker.tasks import Resources, TaskSpec, TaskStatus

MAX_CACHED = 100_000  # nodes whose owner and capabilities are kept in memory

__all__ = [
    "KIND_CAPABILITIES",
    "SCHEMA_VERSION",
    "DuplicateTask",
    "ExpiryOutcome",
    "Heartbeat",
    "HeartbeatOutcome",
    "NodeNotFound",
    "NodeOwnedByOther",
    "NodeRecord",
    "PoolStore",
    "ReportOutcome",
    "ResultInfo",
    "ResultMismatch",
    "StaleLease",
    "StoreError",
    "TaskNeed",
    "TaskRecord",
    "TokenExpired",
    "hash_password",
    "now_ms",
    "verify_password",
]


class PoolStore(LeaseStore):
    """The pool's state in one SQLite file: the seam a pool server talks to (pool/interface.py).

    One connection, used from one thread only: the pool server calls it inline on its event
    loop. Every call is a few indexed statements (sub-millisecond, result blobs aside; the
    pool benchmark records each write transaction's time), so a thread hop would cost more
    than it saves, and running on the loop serialises the transactions, which is what keeps
    the lease logic free of races without extra locks.
    """

    def __init__(self, path: Path | str, *, default_max_attempts: int = 3) -> None:
        super().__init__(path)
        self.default_max_attempts = default_max_attempts
        # Lease transactions run (lease_tasks calls that found a candidate): the count a test
        # reads to show one submit wakes one parked poll, not all of them.
        self.lease_transactions = 0
        # Every call a worker makes checks its node's owner: kept here rather than read and
        # parsed each time (a time limit did not help: with thousands of workers each node
        # calls less often than any useful limit). Nodes change through upsert_node, on this
        # store, which drops the entry; a write by another process drops them all
        # (_check_external_writes).
        self._nodes: dict[str, tuple[str, frozenset[str]]] = {}  # node id -> owner, caps
        # Blobs that no result names and no upload is writing (after a crash mid-upload).
        self._db.execute(
            "INSERT OR IGNORE INTO garbage_blobs(blob_id) SELECT DISTINCT blob_id"
            " FROM blob_chunks WHERE blob_id NOT IN (SELECT blob_id FROM results)"
        )

    def _drop_caches(self) -> None:
        super()._drop_caches()
        self._nodes.clear()

    # -------------------------------------------------------------------- nodes

    def upsert_node(
        self, node_id: str, owner: str, info: pb.RegisterNodeRequest, capabilities: Iterable[str]
    ) -> None:
        info_json = json_format.MessageToJson(info, indent=None)
        caps_json = json.dumps(sorted(set(capabilities)))
        now = now_ms()
        with self._tx() as db:
            row = db.execute("SELECT owner FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
            if row is not None and row["owner"] != owner:
                raise NodeOwnedByOther(node_id)
            db.execute(
                "INSERT INTO nodes(node_id, owner, info, capabilities, registered_ms, last_seen_ms)"
                " VALUES(?, ?, ?, ?, ?, ?) ON CONFLICT(node_id) DO UPDATE SET"
                " info = excluded.info, capabilities = excluded.capabilities,"
                " registered_ms = excluded.registered_ms, last_seen_ms = excluded.last_seen_ms",
                (node_id, owner, info_json, caps_json, now, now),
            )
            self._bump(db, "registrations")
        self._nodes.pop(node_id, None)

    def node_capabilities(self, node_id: str, owner: str) -> frozenset[str]:
        """The capabilities the node registered, checked to belong to `owner` (as get_node)."""
        self._check_external_writes()
        cached = self._nodes.get(node_id)
        if cached is None:
            node = self.get_node(node_id, owner)
            if len(self._nodes) >= MAX_CACHED:
                self._nodes.clear()
            self._nodes[node_id] = (node.owner, node.capabilities)
            return node.capabilities
        if cached[0] != owner:
            raise NodeOwnedByOther(node_id)
        return cached[1]

    def get_node(self, node_id: str, owner: str) -> NodeRecord:
        """The node, checked to belong to `owner`; NodeNotFound / NodeOwnedByOther otherwise."""
        row = self._db.execute(
            "SELECT node_id, owner, capabilities, last_seen_ms, status, metrics FROM nodes"
            " WHERE node_id = ?",
            (node_id,),
        ).fetchone()
        if row is None:
            raise NodeNotFound(node_id)
        if row["owner"] != owner:
            raise NodeOwnedByOther(node_id)
        return NodeRecord(
            node_id=str(row["node_id"]),
            owner=str(row["owner"]),
            capabilities=frozenset(json.loads(row["capabilities"])),
            last_seen_ms=int(row["last_seen_ms"]),
            status=int(row["status"]),
            status_message=str(json.loads(row["metrics"]).get("status_message", "")),
        )

    def count_nodes_seen_since(self, since_ms: int) -> int:
        """Nodes that registered or beat at `since_ms` or later (once, at start: a scan)."""
        row = self._db.execute(
            "SELECT COUNT(*) FROM nodes WHERE last_seen_ms >= ?", (since_ms,)
        ).fetchone()
        return int(row[0])

    # -------------------------------------------------------------------- tasks

    def submit(self, task: TaskSpec, owner: str, now: int | None = None) -> str:
        """Queue a validated task; assigns a uuid4 hex id if it has none."""
        return self.submit_many([task], owner, now)[0]

    def submit_many(
        self, tasks: Sequence[TaskSpec], owner: str, now: int | None = None
    ) -> list[str]:
        """Queue validated tasks in one transaction, all or none (DuplicateTask names the first
        id already taken, or given twice); their ids in order, uuid4 hex where none was given."""
        now = now if now is not None else now_ms()
        rows = []
        for task in tasks:
            task_id = task.task_id or uuid.uuid4().hex
            spec = task.to_proto()
            spec.task_id = task_id
            spec.lease_id = ""
            spec.attempt = 0
            max_attempts = task.max_attempts or self.default_max_attempts
            spec.max_attempts = max_attempts
            res = task.resources
            rows.append(
                (
                    task_id,
                    owner,
                    spec.SerializeToString(),
                    task.kind.value,
                    res.cpus,
                    res.memory_bytes,
                    res.disk_bytes,
                    res.gpus,
                    task.max_result_bytes,
                    TaskStatus.QUEUED.value,
                    max_attempts,
                    now,
                )
            )
        ids = [row[0] for row in rows]
        try:
            with self._tx() as db:
                db.executemany(
                    "INSERT INTO tasks(task_id, owner, spec, kind, cpus, memory_bytes, disk_bytes,"
                    " gpus, max_result_bytes, status, attempt, max_attempts, submitted_ms)"
                    " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
                    rows,
                )
                self._bump(db, "submitted", len(rows))
        except sqlite3.IntegrityError:
            raise DuplicateTask(f"task {self._first_taken(ids)} already exists") from None
        return ids

    def _first_taken(self, ids: Sequence[str]) -> str:
        """The first of `ids` given twice or already in the store (after a refused insert)."""
        seen: set[str] = set()
        for task_id in ids:
            if (
                task_id in seen
                or self._db.execute("SELECT 1 FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
            ):
                return task_id
            seen.add(task_id)
        return ids[0]

    def lease_tasks(
        self,
        node_id: str,
        free: Resources,
        max_tasks: int,
        capabilities: Iterable[str],
        *,
        lease_seconds: float,
        max_timeout_seconds: int = 0,
        networks: frozenset[str] = frozenset({"none"}),
        now: int | None = None,
    ) -> list[pb.TaskSpec]:
        """Hand out queued tasks, oldest first, that fit in `free` (shrinking as they are taken).

        A task that does not fit is skipped, not waited for: a smaller one behind it may
        fit. So is one whose timeout or network this worker does not accept
        (`max_timeout_seconds` 0: any timeout). Each returned spec carries its new lease id
        and attempt number.

        The candidates are read first, outside any write transaction: a poll that finds
        nothing costs one indexed read and never takes the write lock. Only a poll with
        candidates runs a (short) lease transaction, which re-checks each one is still queued.
        """
        caps = set(capabilities)
        kinds = [k.value for k, needs in KIND_CAPABILITIES.items() if needs & caps]
        if not kinds or max_tasks <= 0:
            return []
        remaining = free
        picked: list[tuple[str, pb.TaskSpec, int]] = []
        marks = ",".join("?" * len(kinds))
        cur = self._db.execute(
            "SELECT task_id, spec, cpus, memory_bytes, disk_bytes, gpus, attempt FROM tasks"
            f" WHERE status = 'queued' AND kind IN ({marks})"
            " AND cpus <= ? AND memory_bytes <= ? AND disk_bytes <= ? AND gpus <= ?"
            # Not a task the person cancelled on this very node (exclude_this_node).
            " AND NOT EXISTS (SELECT 1 FROM task_exclusions x"
            " WHERE x.task_id = tasks.task_id AND x.node_id = ?)"
            " ORDER BY submitted_ms, seq",
            (*kinds, free.cpus + 1e-9, free.memory_bytes, free.disk_bytes, free.gpus, node_id),
        )
        try:
            for row in cur:  # lazily, in index order: stops at the first max_tasks that fit
                need = Resources(
                    float(row["cpus"]),
                    int(row["memory_bytes"]),
                    int(row["disk_bytes"]),
                    int(row["gpus"]),
                )
                if not need.fits_in(remaining):
                    continue
                spec = pb.TaskSpec.FromString(row["spec"])
                if max_timeout_seconds and spec.timeout_seconds > max_timeout_seconds:
                    continue
                if (spec.network or "none") not in networks:
                    continue
                needs = required_capability(spec)
                if needs and needs not in caps:
                    continue  # an ml or data task this worker has no runner environment for
                picked.append((str(row["task_id"]), spec, int(row["attempt"])))
                remaining = remaining - need
                if len(picked) >= max_tasks:
                    break
        finally:
            cur.close()
        if not picked:
            return []
        now = now if now is not None else now_ms()
        expires = now + int(lease_seconds * 1000)
        leased: list[pb.TaskSpec] = []
        with self._tx() as db:
            self.lease_transactions += 1
            for task_id, spec, attempt in picked:
                lease_id = uuid.uuid4().hex
                # Still queued? Another process on this file may have taken it since the read.
                taken = db.execute(
                    "UPDATE tasks SET status = ?, node_id = ?, lease_id = ?, lease_expires_ms = ?,"
                    " started_ms = ? WHERE task_id = ? AND status = ? AND attempt = ?",
                    (
                        TaskStatus.RUNNING.value,
                        node_id,
                        lease_id,
                        expires,
                        now,
                        task_id,
                        TaskStatus.QUEUED.value,
                        attempt,
                    ),
                ).rowcount
                if not taken:
                    continue
                spec.lease_id = lease_id
                spec.attempt = attempt
                leased.append(spec)
            if leased:
                self._bump(db, "leased", len(leased))
        return leased

    def task_need(self, task_id: str) -> TaskNeed | None:
        """What a queued task asks of a worker; None unless it is queued (to offer it again)."""
        row = self._db.execute(
            "SELECT spec FROM tasks WHERE task_id = ? AND status = 'queued'", (task_id,)
        ).fetchone()
        if row is None:
            return None
        return TaskNeed.of(TaskSpec.from_proto(pb.TaskSpec.FromString(row["spec"])), task_id)

    def request_cancel(
        self, task_id: str, owner: str, reason: str = "", now: int | None = None
    ) -> TaskStatus | None:
        """Cancel a queued task at once, flag a running one; None if the owner has no such task.

        A finished task keeps its status: cancelling it again is not an error.
        """
        now = now if now is not None else now_ms()
        with self._tx() as db:
            row = db.execute(
                "SELECT status FROM tasks WHERE task_id = ? AND owner = ?", (task_id, owner)
            ).fetchone()
            if row is None:
                return None
            status = TaskStatus(row["status"])
            if status is TaskStatus.QUEUED:
                db.execute(
                    "UPDATE tasks SET status = ?, cancel_requested = 1, finished_ms = ?, error = ?"
                    " WHERE task_id = ?",
                    (
                        TaskStatus.CANCELLED.value,
                        now,
                        reason or "cancelled by the submitter",
                        task_id,
                    ),
                )
                return TaskStatus.CANCELLED
            if status is TaskStatus.RUNNING:
                db.execute("UPDATE tasks SET cancel_requested = 1 WHERE task_id = ?", (task_id,))
            return status

    def record_report(
        self,
        *,
        node_id: str,
        task_id: str,
        lease_id: str,
        status: TaskStatus,
        exit_code: int = 0,
        error: str = "",
        log_tail: bytes = b"",
        result_sha256: str = "",
        result_size: int = 0,
        started_ms: int = 0,
        finished_ms: int = 0,
        usage: dict[str, float] | None = None,
        exclude_node: bool = False,
        now: int | None = None,
    ) -> ReportOutcome:
        """Record a worker's final report for its lease; idempotent per lease.

        CANCELLED wins over whatever the worker says once the submitter asked to cancel. A
        CANCELLED report nobody asked for means the worker gave the task back (it stopped or
        was drained): the task is requeued like an expired lease, attempt + 1; with
        `exclude_node` (the person cancelled it there) it is never leased to that node again.
        """
        now = now if now is not None else now_ms()
        with self._tx() as db:
            seen = db.execute(
                "SELECT task_id, node_id, status FROM reports WHERE lease_id = ?", (lease_id,)
            ).fetchone()
            if seen is not None:
                if seen["task_id"] != task_id or seen["node_id"] != node_id:
                    raise StaleLease(lease_id, task_id)
                return ReportOutcome(TaskStatus(seen["status"]), repeated=True, requeued=False)
            row = db.execute(
                "SELECT status, attempt, max_attempts, cancel_requested FROM tasks"
                " WHERE task_id = ? AND lease_id = ? AND node_id = ?",
                (task_id, lease_id, node_id),
            ).fetchone()
            if row is None or row["status"] != TaskStatus.RUNNING.value:
                raise StaleLease(lease_id, task_id)
            if result_sha256:
                res = db.execute(
                    "SELECT lease_id, sha256, size FROM results WHERE task_id = ?", (task_id,)
                ).fetchone()
                if res is None or res["lease_id"] != lease_id:
                    raise ResultMismatch(
                        f"result_sha256: no result was uploaded for lease {lease_id}"
                    )
                if res["sha256"] != result_sha256 or int(res["size"]) != result_size:
                    raise ResultMismatch(
                        f"result_sha256: the uploaded result for lease {lease_id} is "
                        f"{res['sha256']} ({res['size']} bytes), not {result_sha256} "
                        f"({result_size} bytes)"
                    )
            else:
                db.execute("DELETE FROM results WHERE task_id = ?", (task_id,))
                result_size = 0
            requeued = False
            recorded = status
            if row["cancel_requested"]:
                recorded = TaskStatus.CANCELLED
            elif status is TaskStatus.CANCELLED:
                attempt = int(row["attempt"])
                if attempt < int(row["max_attempts"]):
                    recorded, requeued = TaskStatus.QUEUED, True
                else:
                    recorded = TaskStatus.FAILED
                    error = error or f"given back by the worker {attempt} times; last on {node_id}"
            log_tail = log_tail[-MAX_LOG_TAIL_BYTES:]
            error = error[:MAX_ERROR_CHARS]
            if requeued:
                db.execute(
                    "UPDATE tasks SET status = ?, attempt = attempt + 1, node_id = NULL,"
                    " lease_id = NULL, lease_expires_ms = NULL, started_ms = 0, usage = '{}'"
                    " WHERE task_id = ?",
                    (TaskStatus.QUEUED.value, task_id),
                )
                db.execute("DELETE FROM results WHERE task_id = ?", (task_id,))
                if exclude_node:
                    db.execute(
                        "INSERT OR IGNORE INTO task_exclusions(task_id, node_id) VALUES(?, ?)",
                        (task_id, node_id),
                    )
            else:
                db.execute(
                    "UPDATE tasks SET status = ?, lease_expires_ms = NULL, exit_code = ?,"
                    " error = ?, log_tail = ?, result_sha256 = ?, result_size = ?,"
                    " started_ms = CASE WHEN ? > 0 THEN ? ELSE started_ms END, finished_ms = ?,"
                    " usage = COALESCE(?, usage) WHERE task_id = ?",
                    (
                        recorded.value,
                        exit_code,
                        error,
                        log_tail,
                        result_sha256,
                        result_size,
                        started_ms,
                        started_ms,
                        finished_ms or now,
                        json.dumps(usage) if usage is not None else None,
                        task_id,
                    ),
                )
            db.execute(
                "INSERT INTO reports(lease_id, task_id, node_id, status, reported_ms)"
                " VALUES(?, ?, ?, ?, ?)",
                (lease_id, task_id, node_id, recorded.value, now),
            )
            self._bump(db, "reports")
        return ReportOutcome(recorded, repeated=False, requeued=requeued)

    def count_stale_report(self) -> None:
        with self._tx() as db:
            self._bump(db, "stale_reports")

    def get_task(self, task_id: str, owner: str | None = None) -> TaskRecord | None:
        """The task, or None if it does not exist or (with `owner`) belongs to someone else."""
        row = self._db.execute("SELECT * FROM tasks WHERE task_id = ?", (task_id,)).fetchone()
        if row is None or (owner is not None and row["owner"] != owner):
            return None
        return _task_record(row)

    def list_tasks(
        self, statuses: Iterable[TaskStatus] = (), limit: int = 100, owner: str | None = None
    ) -> list[TaskRecord]:
        """Newest first."""
        where: list[str] = []
        args: list[object] = []
        wanted = [s.value for s in statuses]
        if wanted:
            where.append(f"status IN ({','.join('?' * len(wanted))})")
            args.extend(wanted)
        if owner is not None:
            where.append("owner = ?")
            args.append(owner)
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        args.append(limit)
        rows = self._db.execute(
            f"SELECT * FROM tasks {clause} ORDER BY seq DESC LIMIT ?", args
        ).fetchall()
        return [_task_record(r) for r in rows]
