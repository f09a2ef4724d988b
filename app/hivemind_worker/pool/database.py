"""The pool's SQLite connection: pragmas, migrations, short write transactions and their cost."""

from __future__ import annotations

import sqlite3
import time
from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from hivemind_worker.pool.schema import migrate


class Database:
    """One SQLite connection in WAL mode, used from one thread (the pool's event loop).

    Durability: `synchronous=NORMAL` in WAL mode syncs the log at checkpoints, not at each
    commit. A power cut (not a crash of the pool: the OS still has the data then) can lose the
    last commits before it, never corrupt the file. For leases that is safe: a lost lease or
    renewal means the task is queued again, or expires sooner, and runs once more on a
    worker, whose report for the lost lease is then refused as stale; a lost report means the
    task runs again. Work is repeated, never lost or reported twice (docs/pool.md).
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly by _tx().
        self._db = sqlite3.connect(str(self.path), isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        migrate(self._db, self.path)
        # Write transactions run and how long each took (the recent ones): what a benchmark
        # reads to show the loop is not blocked by SQLite.
        self.write_transactions = 0
        self.tx_seconds: deque[float] = deque(maxlen=50_000)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        started = time.perf_counter()
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        finally:
            self.write_transactions += 1
        self._db.execute("COMMIT")
        self.tx_seconds.append(time.perf_counter() - started)

    def _bump(self, db: sqlite3.Connection, name: str, by: int = 1) -> None:
        db.execute(
            "INSERT INTO counters(name, value) VALUES(?, ?) "
            "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, by),
        )

    def counters(self) -> dict[str, int]:
        """Lifetime totals by name: submitted, leased, expired, heartbeats, reports, uploads..."""
        rows = self._db.execute("SELECT name, value FROM counters").fetchall()
        return {str(r["name"]): int(r["value"]) for r in rows}
