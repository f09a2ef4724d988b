"""The store's lease upkeep: heartbeats' reads and batched writes, renewals, expiry, cancels."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

from hivemind_worker.pool.records import (
    ExpiryOutcome,
    HeartbeatOutcome,
    LivenessRow,
    RenewalRow,
    now_ms,
)
from hivemind_worker.pool.users import UserStore
from hivemind_worker.tasks import TaskStatus


class LeaseStore(UserStore):
    """Keeping leases alive and ending them (and, below it, users, results, the connection)."""

    def check_heartbeat(self, node_id: str, lease_ids: Sequence[str]) -> HeartbeatOutcome:
        """What a heartbeat is answered, read without writing: lost leases, pending cancels.

        A listed lease is lost unless it is running on this node, or already reported by it
        (the worker is done with it). Renewals are noted by the caller and written by
        `record_liveness`.
        """
        lost: list[str] = []
        for lease_id in dict.fromkeys(lease_ids):
            if self._db.execute(
                "SELECT 1 FROM tasks WHERE lease_id = ? AND node_id = ? AND status = 'running'",
                (lease_id, node_id),
            ).fetchone():
                continue
            if not self._db.execute(
                "SELECT 1 FROM reports WHERE lease_id = ? AND node_id = ?", (lease_id, node_id)
            ).fetchone():
                lost.append(lease_id)
        return HeartbeatOutcome(lost, self.cancels_for(node_id))

    def record_liveness(
        self, nodes: Sequence[LivenessRow], renewals: Sequence[RenewalRow], beats: int
    ) -> None:
        """Write the heartbeats noted since the last flush, in one transaction.

        Each node's last beat (seen time, status, metrics); each renewed lease's expiry, only
        ever extended (`MAX`), and only while it is still running on that node: a lease
        reported or expired since is left alone.
        """
        with self._tx() as db:
            db.executemany(
                "UPDATE nodes SET last_seen_ms = ?, status = ?, metrics = ? WHERE node_id = ?",
                [(n.seen_ms, n.status, n.metrics_json, n.node_id) for n in nodes],
            )
            db.executemany(
                "UPDATE tasks SET lease_expires_ms = MAX(lease_expires_ms, ?),"
                " usage = COALESCE(?, usage)"
                " WHERE lease_id = ? AND node_id = ? AND status = 'running'",
                [
                    (
                        r.expires_ms,
                        json.dumps(r.usage) if r.usage is not None else None,
                        r.lease_id,
                        r.node_id,
                    )
                    for r in renewals
                ],
            )
            if beats:
                self._bump(db, "heartbeats", beats)

    def renew(
        self,
        node_id: str,
        lease_ids: Sequence[str],
        lease_seconds: float,
        usage: dict[str, dict[str, float]] | None = None,
        now: int | None = None,
    ) -> list[str]:
        """Extend the node's listed leases; return those the pool no longer honours.

        A lease already reported is neither renewed nor lost: the worker is done with it.
        """
        now = now if now is not None else now_ms()
        with self._tx() as db:
            return self._renew(db, node_id, lease_ids, lease_seconds, usage or {}, now)

    @staticmethod
    def _renew(
        db: sqlite3.Connection,
        node_id: str,
        lease_ids: Sequence[str],
        lease_seconds: float,
        usage: dict[str, dict[str, float]],
        now: int,
    ) -> list[str]:
        expires = now + int(lease_seconds * 1000)
        lost: list[str] = []
        for lease_id in dict.fromkeys(lease_ids):
            cur = db.execute(
                "UPDATE tasks SET lease_expires_ms = MAX(lease_expires_ms, ?),"
                " usage = COALESCE(?, usage)"
                " WHERE lease_id = ? AND node_id = ? AND status = ?",
                (
                    expires,
                    json.dumps(usage[lease_id]) if lease_id in usage else None,
                    lease_id,
                    node_id,
                    TaskStatus.RUNNING.value,
                ),
            )
            if cur.rowcount:
                continue
            reported = db.execute(
                "SELECT 1 FROM reports WHERE lease_id = ? AND node_id = ?", (lease_id, node_id)
            ).fetchone()
            if reported is None:
                lost.append(lease_id)
        return lost

    def extend_running_leases(self, until_ms: int) -> int:
        """Make every running lease last at least until `until_ms` (on start: time to reconnect)."""
        with self._tx() as db:
            cur = db.execute(
                "UPDATE tasks SET lease_expires_ms = ? WHERE status = ? AND lease_expires_ms < ?",
                (until_ms, TaskStatus.RUNNING.value, until_ms),
            )
            return cur.rowcount

    def expire_leases(self, now: int | None = None) -> ExpiryOutcome:
        """Requeue tasks whose lease ran out (attempt + 1), or fail them when attempts are spent."""
        now = now if now is not None else now_ms()
        out = ExpiryOutcome()
        with self._tx() as db:
            rows = db.execute(
                # Named: without statistics SQLite would take tasks_by_status and read every
                # running lease; this partial index goes straight to the expired ones.
                "SELECT task_id, attempt, max_attempts, node_id, cancel_requested FROM tasks"
                " INDEXED BY tasks_running_by_expiry"
                " WHERE status = 'running' AND lease_expires_ms <= ?",
                (now,),
            ).fetchall()
            for row in rows:
                task_id = str(row["task_id"])
                attempt = int(row["attempt"])
                if row["cancel_requested"]:
                    db.execute(
                        "UPDATE tasks SET status = ?, lease_id = NULL, lease_expires_ms = NULL,"
                        " finished_ms = ?, error = ? WHERE task_id = ?",
                        (
                            TaskStatus.CANCELLED.value,
                            now,
                            f"cancelled; the lease on node {row['node_id']} expired",
                            task_id,
                        ),
                    )
                    out.cancelled.append(task_id)
                elif attempt >= int(row["max_attempts"]):
                    db.execute(
                        "UPDATE tasks SET status = ?, lease_id = NULL, lease_expires_ms = NULL,"
                        " finished_ms = ?, error = ? WHERE task_id = ?",
                        (
                            TaskStatus.FAILED.value,
                            now,
                            f"lease expired {attempt} times; last on node {row['node_id']}",
                            task_id,
                        ),
                    )
                    out.failed.append(task_id)
                else:
                    db.execute(
                        "UPDATE tasks SET status = ?, attempt = attempt + 1, node_id = NULL,"
                        " lease_id = NULL, lease_expires_ms = NULL, started_ms = 0,"
                        " usage = '{}' WHERE task_id = ?",
                        (TaskStatus.QUEUED.value, task_id),
                    )
                    out.requeued.append(task_id)
            if rows:
                self._bump(db, "expired", len(rows))
        return out

    def cancels_for(self, node_id: str) -> list[str]:
        rows = self._db.execute(
            # Literal conditions, so SQLite can use the partial index tasks_cancels_by_node.
            "SELECT task_id FROM tasks WHERE node_id = ? AND status = 'running'"
            " AND cancel_requested = 1",
            (node_id,),
        ).fetchall()
        return [str(r["task_id"]) for r in rows]
