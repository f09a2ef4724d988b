"""Durable result spool: a finished task's report and archive outlive a crash until delivered."""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.tasks import TaskResult, TaskStatus

_SCHEMA = """
CREATE TABLE IF NOT EXISTS results (
    task_id TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    status TEXT NOT NULL,
    exit_code INTEGER NOT NULL,
    error TEXT NOT NULL,
    log_tail BLOB NOT NULL,
    archive TEXT,
    archive_sha256 TEXT NOT NULL,
    archive_size INTEGER NOT NULL,
    started_at REAL NOT NULL,
    finished_at REAL NOT NULL,
    cpu_seconds REAL NOT NULL,
    max_memory_bytes INTEGER NOT NULL,
    max_result_bytes INTEGER NOT NULL,
    PRIMARY KEY (task_id, lease_id)
);
-- Leases whose result the pool has settled: a lease handed out again is never run twice.
CREATE TABLE IF NOT EXISTS reported (
    task_id TEXT NOT NULL,
    lease_id TEXT NOT NULL,
    settled_at REAL NOT NULL,
    PRIMARY KEY (task_id, lease_id)
);
"""


class OutboxFull(HiveMindError):
    """The spool holds as much as it may; no new task is taken until results drain."""

    kind = ErrorKind.DISK_FULL
    title = "Result spool full"


@dataclass(frozen=True)
class Pending:
    result: TaskResult
    max_result_bytes: int


def _fsync_dir(path: Path) -> None:
    if os.name != "posix":  # directories cannot be opened for fsync on Windows
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Outbox:
    """Records in SQLite, archives as files beside them, both synced before a report is sent.

    Blocking (file and SQLite I/O): the engine calls it through asyncio.to_thread. A lock
    serialises those calls, which may come from different worker threads.
    """

    def __init__(self, directory: Path, *, max_bytes: int = 4 * 1024**3) -> None:
        self.directory = directory
        self.max_bytes = max_bytes
        directory.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(directory / "outbox.db", check_same_thread=False)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")  # a spooled result must survive power loss
        self._db.executescript(_SCHEMA)
        self._sweep()

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._db:
            yield self._db

    def _sweep(self) -> None:
        """Remove archive files no record points at (a crash between file and record)."""
        with self._tx() as db:
            known = {row[0] for row in db.execute("SELECT archive FROM results") if row[0]}
        for path in self.directory.glob("*.tar.gz"):
            if path.name not in known:
                path.unlink(missing_ok=True)

    def used_bytes(self) -> int:
        with self._tx() as db:
            (total,) = db.execute("SELECT COALESCE(SUM(archive_size), 0) FROM results").fetchone()
        return int(total)

    def is_full(self) -> bool:
        return self.used_bytes() >= self.max_bytes

    def put(self, result: TaskResult, max_result_bytes: int) -> TaskResult:
        """Keep the result durably; returns it with its archive moved into the spool."""
        archive_name: str | None = None
        if result.archive is not None:
            if self.used_bytes() + result.archive_size > self.max_bytes:
                raise OutboxFull(
                    f"the result spool in {self.directory} is full "
                    f"({self.max_bytes >> 20} MiB); results wait for the pool"
                )
            archive_name = f"{result.task_id}-{result.lease_id}.tar.gz"
            target = self.directory / archive_name
            with result.archive.open("rb") as fh:
                os.fsync(fh.fileno())
            os.replace(result.archive, target)
            _fsync_dir(self.directory)
            result.archive = target
        with self._tx() as db:
            db.execute(
                "INSERT OR REPLACE INTO results VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (
                    result.task_id,
                    result.lease_id,
                    result.status.value,
                    result.exit_code,
                    result.error,
                    result.log_tail,
                    archive_name,
                    result.archive_sha256,
                    result.archive_size,
                    result.started_at,
                    result.finished_at,
                    result.cpu_seconds,
                    result.max_memory_bytes,
                    max_result_bytes,
                ),
            )
        return result

    def remove(self, task_id: str, lease_id: str) -> None:
        """Forget a result the pool acknowledged or refused for good."""
        self.settle(task_id, lease_id)

    def settle(self, task_id: str, lease_id: str) -> None:
        """The pool has settled this lease: drop its result, and remember the lease."""
        with self._tx() as db:
            row = db.execute(
                "SELECT archive FROM results WHERE task_id = ? AND lease_id = ?",
                (task_id, lease_id),
            ).fetchone()
            db.execute(
                "DELETE FROM results WHERE task_id = ? AND lease_id = ?", (task_id, lease_id)
            )
            db.execute(
                "INSERT OR REPLACE INTO reported VALUES (?, ?, ?)",
                (task_id, lease_id, time.time()),
            )
        if row is not None and row[0]:
            (self.directory / row[0]).unlink(missing_ok=True)

    def reported_leases(self, since: float) -> set[tuple[str, str]]:
        """Leases settled since `since` (epoch seconds); older ones are forgotten."""
        with self._tx() as db:
            db.execute("DELETE FROM reported WHERE settled_at < ?", (since,))
            rows = db.execute("SELECT task_id, lease_id FROM reported").fetchall()
        return {(row[0], row[1]) for row in rows}

    def pending(self) -> list[Pending]:
        """Every result still owed to the pool, oldest first."""
        with self._tx() as db:
            rows = db.execute("SELECT * FROM results ORDER BY finished_at").fetchall()
        pending = []
        for row in rows:
            archive = self.directory / row[6] if row[6] else None
            if archive is not None and not archive.exists():
                archive = None  # lost with the disk; the report still goes, without results
            pending.append(
                Pending(
                    TaskResult(
                        task_id=row[0],
                        lease_id=row[1],
                        status=TaskStatus(row[2]),
                        exit_code=row[3],
                        error=row[4],
                        log_tail=row[5],
                        archive=archive,
                        archive_sha256=row[7] if archive is not None else "",
                        archive_size=row[8] if archive is not None else 0,
                        started_at=row[9],
                        finished_at=row[10],
                        cpu_seconds=row[11],
                        max_memory_bytes=row[12],
                    ),
                    max_result_bytes=row[13],
                )
            )
        return pending
