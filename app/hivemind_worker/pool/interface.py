"""The store the pool's services talk to: the seam where another backend (PostgreSQL) plugs in.

Everything the gRPC services, the long-poll queue, the heartbeat batcher and the reaper ask
of their state goes through this Protocol; `PoolStore` (SQLite) is the one implementation.
The rules an implementation must keep, whatever it is built on (docs/pool.md):

- A lease is taken in one transaction that re-checks the task is still queued: two callers
  can never both lease one task (SQLite: the single writer; PostgreSQL: `SELECT ... FOR
  UPDATE SKIP LOCKED`).
- `lease_tasks` that finds nothing writes nothing.
- A report is recorded once per lease; a repeat returns the first outcome; a report, renewal
  or upload for a lease that is not current raises StaleLease.
- Renewals only extend (`MAX(expiry, new)`), and an expired lease goes back to the queue with
  attempt + 1, or fails when its attempts are spent. Heartbeats are noted in memory
  (heartbeats.Liveness) and written by `record_liveness` before each reaper pass.
- Every method is short and returns promptly: the SQLite store runs them on the event loop.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Protocol

from hivemind_worker.pool.records import (
    ExpiryOutcome,
    HeartbeatOutcome,
    LivenessRow,
    RenewalRow,
    ReportOutcome,
    ResultInfo,
    TaskNeed,
    TaskRecord,
)
from hivemind_worker.protocol import nodepool_pb2 as pb
from hivemind_worker.tasks import Resources, TaskSpec, TaskStatus


class TaskStore(Protocol):
    """Users and tokens, nodes, tasks and their leases, reports and result blobs."""

    # Observability: write transactions run, and lease transactions among them.
    write_transactions: int
    lease_transactions: int

    def close(self) -> None: ...

    # users and tokens
    def password_hash(self, username: str) -> str | None: ...
    def issue_token(self, username: str, ttl_seconds: int) -> tuple[str, int]: ...
    def token_user(self, token: str, now: int | None = None) -> str | None: ...

    # nodes
    def upsert_node(
        self, node_id: str, owner: str, info: pb.RegisterNodeRequest, capabilities: Iterable[str]
    ) -> None: ...
    def node_capabilities(self, node_id: str, owner: str) -> frozenset[str]: ...
    def count_nodes_seen_since(self, since_ms: int) -> int: ...
    def check_heartbeat(self, node_id: str, lease_ids: Sequence[str]) -> HeartbeatOutcome: ...
    def record_liveness(
        self, nodes: Sequence[LivenessRow], renewals: Sequence[RenewalRow], beats: int
    ) -> None: ...

    # tasks and leases
    def submit(self, task: TaskSpec, owner: str, now: int | None = None) -> str: ...
    def submit_many(
        self, tasks: Sequence[TaskSpec], owner: str, now: int | None = None
    ) -> list[str]: ...
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
    ) -> list[pb.TaskSpec]: ...
    def task_need(self, task_id: str) -> TaskNeed | None: ...
    def lease_is_current(self, task_id: str, lease_id: str, node_id: str) -> bool: ...
    def extend_running_leases(self, until_ms: int) -> int: ...
    def expire_leases(self, now: int | None = None) -> ExpiryOutcome: ...
    def request_cancel(
        self, task_id: str, owner: str, reason: str = "", now: int | None = None
    ) -> TaskStatus | None: ...
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
        exclude_node: bool = False,  # CANCELLED by the person on node_id: never lease it there
        now: int | None = None,
    ) -> ReportOutcome: ...
    def count_stale_report(self) -> None: ...
    def get_task(self, task_id: str, owner: str | None = None) -> TaskRecord | None: ...
    def list_tasks(
        self, statuses: Iterable[TaskStatus] = (), limit: int = 100, owner: str | None = None
    ) -> list[TaskRecord]: ...

    # result blobs: staged chunk by chunk, then swapped in for a current lease
    def new_blob(self) -> str: ...
    def add_blob_chunk(self, blob_id: str, seq: int, data: bytes) -> None: ...
    def discard_blob(self, blob_id: str) -> None: ...
    def commit_result(
        self,
        task_id: str,
        lease_id: str,
        node_id: str,
        *,
        sha256: str,
        size: int,
        blob_id: str,
        chunks: int,
    ) -> bool: ...
    def collect_garbage(self, max_chunks: int = 8) -> int: ...
    def get_result(self, task_id: str) -> ResultInfo | None: ...
    def result_chunk(self, task_id: str, seq: int) -> bytes: ...
