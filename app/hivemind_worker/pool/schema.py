"""The pool database's schema and its migrations, one version at a time."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

from hivemind_worker.pool.records import StoreError

SCHEMA_VERSION = 4

# Version 1, as first released; a new database is created at version 1 and migrated, so every
# database takes the same path.
_SCHEMA_V1 = """
CREATE TABLE users (
    username    TEXT PRIMARY KEY,
    password    TEXT NOT NULL,          -- scrypt$n$r$p$salt_hex$hash_hex
    created_ms  INTEGER NOT NULL
);
CREATE TABLE tokens (
    token_sha256 TEXT PRIMARY KEY,
    username     TEXT NOT NULL REFERENCES users(username) ON DELETE CASCADE,
    expires_ms   INTEGER NOT NULL
);
CREATE TABLE nodes (
    node_id       TEXT PRIMARY KEY,
    owner         TEXT NOT NULL REFERENCES users(username),
    info          TEXT NOT NULL,        -- RegisterNodeRequest as JSON
    capabilities  TEXT NOT NULL,        -- JSON list
    registered_ms INTEGER NOT NULL,
    last_seen_ms  INTEGER NOT NULL,
    status        INTEGER NOT NULL DEFAULT 0,
    metrics       TEXT NOT NULL DEFAULT '{}'
);
CREATE TABLE tasks (
    seq              INTEGER PRIMARY KEY AUTOINCREMENT,
    task_id          TEXT NOT NULL UNIQUE,
    owner            TEXT NOT NULL REFERENCES users(username),
    spec             BLOB NOT NULL,     -- pb.TaskSpec with defaults applied, no lease
    kind             TEXT NOT NULL,
    cpus             REAL NOT NULL,
    memory_bytes     INTEGER NOT NULL,
    disk_bytes       INTEGER NOT NULL,
    gpus             INTEGER NOT NULL,
    max_result_bytes INTEGER NOT NULL,
    status           TEXT NOT NULL,
    attempt          INTEGER NOT NULL DEFAULT 1,
    max_attempts     INTEGER NOT NULL,
    node_id          TEXT,
    lease_id         TEXT,
    lease_expires_ms INTEGER,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    exit_code        INTEGER NOT NULL DEFAULT 0,
    error            TEXT NOT NULL DEFAULT '',
    log_tail         BLOB NOT NULL DEFAULT x'',
    result_sha256    TEXT NOT NULL DEFAULT '',
    result_size      INTEGER NOT NULL DEFAULT 0,
    submitted_ms     INTEGER NOT NULL,
    started_ms       INTEGER NOT NULL DEFAULT 0,
    finished_ms      INTEGER NOT NULL DEFAULT 0,
    usage            TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX tasks_by_status ON tasks(status, submitted_ms, seq);
CREATE INDEX tasks_by_owner ON tasks(owner, seq);
CREATE UNIQUE INDEX tasks_by_lease ON tasks(lease_id) WHERE lease_id IS NOT NULL;
CREATE TABLE reports (
    lease_id    TEXT PRIMARY KEY,
    task_id     TEXT NOT NULL REFERENCES tasks(task_id) ON DELETE CASCADE,
    node_id     TEXT NOT NULL,
    status      TEXT NOT NULL,          -- what was recorded, returned again on a repeat
    reported_ms INTEGER NOT NULL
);
CREATE TABLE results (
    task_id  TEXT PRIMARY KEY REFERENCES tasks(task_id) ON DELETE CASCADE,
    lease_id TEXT NOT NULL,
    sha256   TEXT NOT NULL,
    size     INTEGER NOT NULL,
    chunks   INTEGER NOT NULL
);
-- Results are kept in the chunks they arrived in (each at most 1 MiB): SQLite caps a single
-- blob below 1 GiB, and downloads can then stream without loading the whole archive.
CREATE TABLE result_chunks (
    task_id TEXT NOT NULL REFERENCES results(task_id) ON DELETE CASCADE,
    seq     INTEGER NOT NULL,
    data    BLOB NOT NULL,
    PRIMARY KEY (task_id, seq)
);
CREATE TABLE counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
);
"""

# Version 2: a result's content lives in blob_chunks under its own blob id, so an upload can be
# written in many short transactions before one short transaction makes it the task's result,
# and a replaced or deleted result is freed in bounded batches (collect_garbage), never in one
# long transaction. The triggers queue a blob for collection whenever no result names it any
# more; a blob still being written is named by no result and by no garbage row until its
# upload ends.
_MIGRATE_V2 = """
ALTER TABLE results ADD COLUMN blob_id TEXT NOT NULL DEFAULT '';
UPDATE results SET blob_id = task_id;
CREATE TABLE blob_chunks (
    blob_id TEXT NOT NULL,
    seq     INTEGER NOT NULL,
    data    BLOB NOT NULL,              -- at most 1 MiB each
    PRIMARY KEY (blob_id, seq)
);
INSERT INTO blob_chunks(blob_id, seq, data) SELECT task_id, seq, data FROM result_chunks;
DROP TABLE result_chunks;
CREATE TABLE garbage_blobs (
    blob_id TEXT PRIMARY KEY
);
CREATE TRIGGER results_free_on_delete AFTER DELETE ON results BEGIN
    INSERT OR IGNORE INTO garbage_blobs(blob_id) VALUES (old.blob_id);
END;
CREATE TRIGGER results_free_on_replace AFTER UPDATE OF blob_id ON results
WHEN old.blob_id <> new.blob_id BEGIN
    INSERT OR IGNORE INTO garbage_blobs(blob_id) VALUES (old.blob_id);
END;
"""

# Version 3: indexes for the hot paths of a pool with thousands of workers. The lease reaper
# looks only at running leases by expiry; a heartbeat asks only for the node's pending
# cancels; issuing a token drops the expired ones. Partial indexes keep each one small: they
# hold running tasks (or a handful of cancels), never the whole history. The queries that
# use them spell the same literal conditions, which is what lets SQLite pick them
# (tests/integration/test_pool_query_plans.py checks it with EXPLAIN QUERY PLAN).
_MIGRATE_V3 = """
CREATE INDEX tasks_running_by_expiry ON tasks(lease_expires_ms) WHERE status = 'running';
CREATE INDEX tasks_cancels_by_node ON tasks(node_id)
    WHERE status = 'running' AND cancel_requested = 1;
CREATE INDEX tokens_by_expiry ON tokens(expires_ms);
"""

# Version 4: tasks a person cancelled on their own node, never to be leased to that node again
# (ReportTaskResultRequest.exclude_this_node). Deleted with the task; the lease query checks
# it by primary key.
_MIGRATE_V4 = """
CREATE TABLE task_exclusions (
    task_id TEXT NOT NULL REFERENCES tasks(task_id) ON DELETE CASCADE,
    node_id TEXT NOT NULL,
    PRIMARY KEY (task_id, node_id)
);
"""


def _statements(script: str) -> Iterator[str]:
    """The statements of a script, triggers (with `;` inside) kept whole."""
    pending = ""
    for line in script.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            yield pending.strip()
            pending = ""
    if pending.strip():
        raise ValueError(f"incomplete SQL statement: {pending.strip()[:80]}")


def migrate(db: sqlite3.Connection, path: object) -> None:
    """Take the database to SCHEMA_VERSION, every step in one transaction; refuse a newer one."""
    version = int(db.execute("PRAGMA user_version").fetchone()[0])
    if version == SCHEMA_VERSION:
        return
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"{path} has schema version {version}; this pool knows up to "
            f"{SCHEMA_VERSION}: use a newer hivemind-worker"
        )
    db.execute("BEGIN IMMEDIATE")
    try:
        # Each step takes the schema one version up; v1 -> v2 copies stored results once.
        for step, script in ((1, _SCHEMA_V1), (2, _MIGRATE_V2), (3, _MIGRATE_V3), (4, _MIGRATE_V4)):
            if version < step:
                for statement in _statements(script):
                    db.execute(statement)
        db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
