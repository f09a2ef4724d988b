"""The store's results: uploads staged as chunked blobs, committed in one short transaction."""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Iterable

from hivemind_worker.pool.database import Database
from hivemind_worker.pool.records import ResultInfo, StaleLease, StoreError
from hivemind_worker.tasks import TaskStatus


class ResultStore(Database):
    """Result blobs: staged chunk by chunk, swapped in for a current lease, freed in batches."""

    def lease_is_current(self, task_id: str, lease_id: str, node_id: str) -> bool:
        return self._lease_is_current(self._db, task_id, lease_id, node_id)

    @staticmethod
    def _lease_is_current(
        db: sqlite3.Connection, task_id: str, lease_id: str, node_id: str
    ) -> bool:
        row = db.execute(
            "SELECT 1 FROM tasks WHERE task_id = ? AND lease_id = ? AND node_id = ? AND status = ?",
            (task_id, lease_id, node_id, TaskStatus.RUNNING.value),
        ).fetchone()
        return row is not None

    def new_blob(self) -> str:
        """A fresh blob id to write an upload under (add_blob_chunk), then commit_result."""
        return f"b-{uuid.uuid4().hex}"

    def add_blob_chunk(self, blob_id: str, seq: int, data: bytes) -> None:
        """Write one chunk (at most 1 MiB) of a blob being staged: one short transaction."""
        self._db.execute(
            "INSERT INTO blob_chunks(blob_id, seq, data) VALUES(?, ?, ?)", (blob_id, seq, data)
        )

    def discard_blob(self, blob_id: str) -> None:
        """Give up a staged blob: collect_garbage frees it later, a few chunks at a time."""
        self._db.execute("INSERT OR IGNORE INTO garbage_blobs(blob_id) VALUES(?)", (blob_id,))

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
    ) -> bool:
        """Make a staged blob the result of a current lease, replacing any earlier upload.

        One short transaction that checks the lease and swaps the result in, so a lease that
        expired while the blob was written is refused (StaleLease). Uploading the same archive
        again for a lease already reported is accepted as a no-op (False). Whenever the blob
        does not become the result it is discarded.
        """
        try:
            with self._tx() as db:
                if not self._lease_is_current(db, task_id, lease_id, node_id):
                    same = db.execute(
                        "SELECT 1 FROM results WHERE task_id = ? AND lease_id = ? AND sha256 = ?",
                        (task_id, lease_id, sha256),
                    ).fetchone()
                    if same is not None:
                        self.discard_blob(blob_id)
                        return False
                    raise StaleLease(lease_id, task_id)
                db.execute(
                    "INSERT INTO results(task_id, lease_id, sha256, size, chunks, blob_id)"
                    " VALUES(?, ?, ?, ?, ?, ?) ON CONFLICT(task_id) DO UPDATE SET"
                    " lease_id = excluded.lease_id, sha256 = excluded.sha256,"
                    " size = excluded.size, chunks = excluded.chunks, blob_id = excluded.blob_id",
                    (task_id, lease_id, sha256, size, chunks, blob_id),
                )
                self._bump(db, "uploads")
                return True
        except BaseException:
            self.discard_blob(blob_id)
            raise

    def store_result(
        self,
        task_id: str,
        lease_id: str,
        node_id: str,
        *,
        sha256: str,
        size: int,
        chunks: Iterable[bytes],
    ) -> None:
        """Stage `chunks` (each at most 1 MiB) and commit them as the result (small results)."""
        blob_id = self.new_blob()
        count = 0
        try:
            for data in chunks:
                if data:
                    self.add_blob_chunk(blob_id, count, data)
                    count += 1
        except BaseException:
            self.discard_blob(blob_id)
            raise
        self.commit_result(
            task_id, lease_id, node_id, sha256=sha256, size=size, blob_id=blob_id, chunks=count
        )

    def collect_garbage(self, max_chunks: int = 8) -> int:
        """Free up to `max_chunks` chunks of discarded blobs; how many were freed.

        Deleting a blob reads its overflow pages, so a big one is freed over many short calls.
        """
        freed = 0
        while freed < max_chunks:
            row = self._db.execute("SELECT blob_id FROM garbage_blobs LIMIT 1").fetchone()
            if row is None:
                break
            blob_id = str(row["blob_id"])
            want = max_chunks - freed
            with self._tx() as db:
                cur = db.execute(
                    "DELETE FROM blob_chunks WHERE blob_id = ? AND seq IN"
                    " (SELECT seq FROM blob_chunks WHERE blob_id = ? ORDER BY seq LIMIT ?)",
                    (blob_id, blob_id, want),
                )
                freed += cur.rowcount
                if cur.rowcount < want:
                    db.execute("DELETE FROM garbage_blobs WHERE blob_id = ?", (blob_id,))
        return freed

    def get_result(self, task_id: str) -> ResultInfo | None:
        """The reported result of a task (an upload that no report names does not count)."""
        row = self._db.execute(
            "SELECT r.* FROM results r JOIN tasks t ON t.task_id = r.task_id"
            " WHERE r.task_id = ? AND t.result_sha256 = r.sha256 AND t.lease_id = r.lease_id",
            (task_id,),
        ).fetchone()
        if row is None:
            return None
        return ResultInfo(
            task_id=str(row["task_id"]),
            lease_id=str(row["lease_id"]),
            sha256=str(row["sha256"]),
            size=int(row["size"]),
            chunks=int(row["chunks"]),
        )

    def result_chunk(self, task_id: str, seq: int) -> bytes:
        row = self._db.execute(
            "SELECT c.data FROM results r JOIN blob_chunks c ON c.blob_id = r.blob_id"
            " WHERE r.task_id = ? AND c.seq = ?",
            (task_id, seq),
        ).fetchone()
        if row is None:
            raise StoreError(f"result of task {task_id} is missing chunk {seq}")
        return bytes(row["data"])

    def result_bytes(self, task_id: str) -> bytes | None:
        info = self.get_result(task_id)
        if info is None:
            return None
        return b"".join(self.result_chunk(task_id, i) for i in range(info.chunks))
