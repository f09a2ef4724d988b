"""The reference pool's SQLite store: users, tokens, nodes, tasks, leases, reports and results."""

from __future__ import annotations

import hashlib
import hmac
import json
import secrets
import sqlite3
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from google.protobuf import json_format

from hivemind_worker.engine.tasks import Resources, TaskKind, TaskSpec, TaskStatus
from hivemind_worker.protocol import nodepool_pb2 as pb

SCHEMA_VERSION = 2

#: What a Python task can run on, and what a container task can run on.
KIND_CAPABILITIES: dict[TaskKind, frozenset[str]] = {
    TaskKind.PYTHON: frozenset({"process", "docker"}),
    TaskKind.CONTAINER: frozenset({"docker"}),
}
MAX_LOG_TAIL_BYTES = 64 * 1024
MAX_ERROR_CHARS = 4000

# scrypt with n=2**14, r=8 costs 16 MiB and tens of milliseconds: slow for guessing, fine for
# logins. The parameters are stored with each hash so they can be raised later.
_SCRYPT_N = 2**14
_SCRYPT_R = 8
_SCRYPT_P = 1
_SCRYPT_LEN = 32

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


def now_ms() -> int:
    return int(time.time() * 1000)


class StoreError(Exception):
    """A request the store refuses; `str()` is the reason given to the caller."""


class DuplicateTask(StoreError):
    pass


class StaleLease(StoreError):
    def __init__(self, lease_id: str, task_id: str) -> None:
        super().__init__(f"lease {lease_id} is no longer current for task {task_id}")
        self.lease_id = lease_id
        self.task_id = task_id


class ResultMismatch(StoreError):
    """A report names a result digest that was not uploaded for its lease."""


class TokenExpired(StoreError):
    def __init__(self) -> None:
        super().__init__("token expired; log in again")


class NodeNotFound(StoreError):
    def __init__(self, node_id: str) -> None:
        super().__init__(f"node {node_id} is not registered")


class NodeOwnedByOther(StoreError):
    def __init__(self, node_id: str) -> None:
        super().__init__(f"node {node_id} is registered to another user")


@dataclass(frozen=True)
class NodeRecord:
    node_id: str
    owner: str
    capabilities: frozenset[str]
    last_seen_ms: int
    status: int
    status_message: str = ""  # why, when the node paused by its own rules ("on battery")


@dataclass(frozen=True)
class TaskRecord:
    task_id: str
    owner: str
    spec: pb.TaskSpec
    status: TaskStatus
    attempt: int
    max_attempts: int
    node_id: str
    lease_id: str
    lease_expires_ms: int
    cancel_requested: bool
    exit_code: int
    error: str
    log_tail: bytes
    result_sha256: str
    result_size: int
    submitted_ms: int
    started_ms: int
    finished_ms: int
    usage: dict[str, float]

    def to_info(self, *, with_contents: bool = True) -> pb.TaskInfo:
        """The wire view; without contents (inputs, source, log) for listings."""
        spec = pb.TaskSpec()
        spec.CopyFrom(self.spec)
        spec.attempt = self.attempt
        spec.lease_id = self.lease_id  # the current (or last) lease: lets a submitter correlate
        if not with_contents:
            for f in spec.input_files:
                f.content = b""
            spec.input_archive = b""
            spec.source = ""
        return pb.TaskInfo(
            spec=spec,
            status=self.status.to_proto(),
            attempt=self.attempt,
            node_id=self.node_id,
            exit_code=self.exit_code,
            error=self.error,
            log_tail=self.log_tail if with_contents else b"",
            result_sha256=self.result_sha256,
            result_size=self.result_size,
            submitted_unix_ms=self.submitted_ms,
            started_unix_ms=self.started_ms,
            finished_unix_ms=self.finished_ms,
            usage=pb.ResourceUsage(
                cpu_seconds=float(self.usage.get("cpu_seconds", 0.0)),
                max_memory_bytes=int(self.usage.get("max_memory_bytes", 0)),
                cpu_percent=float(self.usage.get("cpu_percent", 0.0)),
                memory_bytes=int(self.usage.get("memory_bytes", 0)),
            ),
            cancel_requested=self.cancel_requested,
        )


@dataclass(frozen=True)
class ReportOutcome:
    recorded: TaskStatus
    repeated: bool  # the same lease was reported before; nothing changed
    requeued: bool  # the worker gave the task back; it waits for another worker


@dataclass
class ExpiryOutcome:
    requeued: list[str] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    cancelled: list[str] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.requeued or self.failed or self.cancelled)


@dataclass(frozen=True)
class ResultInfo:
    task_id: str
    lease_id: str
    sha256: str
    size: int
    chunks: int


def hash_password(password: str, salt: bytes | None = None) -> str:
    """An scrypt hash in the stored form `scrypt$n$r$p$salt$hash`."""
    salt = salt if salt is not None else secrets.token_bytes(16)
    digest = hashlib.scrypt(
        password.encode(),
        salt=salt,
        n=_SCRYPT_N,
        r=_SCRYPT_R,
        p=_SCRYPT_P,
        dklen=_SCRYPT_LEN,
        maxmem=64 * 1024 * 1024,
    )
    return f"scrypt${_SCRYPT_N}${_SCRYPT_R}${_SCRYPT_P}${salt.hex()}${digest.hex()}"


def verify_password(password: str, stored: str | None) -> bool:
    """Constant-time check; with no stored hash it still spends the same work."""
    if stored is None:
        hash_password(password)  # so an unknown user costs as much as a wrong password
        return False
    try:
        scheme, n, r, p, salt_hex, hash_hex = stored.split("$")
        if scheme != "scrypt":
            return False
        digest = hashlib.scrypt(
            password.encode(),
            salt=bytes.fromhex(salt_hex),
            n=int(n),
            r=int(r),
            p=int(p),
            dklen=len(hash_hex) // 2,
            maxmem=256 * 1024 * 1024,
        )
    except ValueError:
        return False
    return hmac.compare_digest(digest.hex(), hash_hex)


def _token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class PoolStore:
    """The pool's state in one SQLite file.

    One connection, used from one thread only: the pool server calls it inline on its event
    loop. Every call is a few indexed statements (sub-millisecond, result blobs aside), so a
    thread hop would cost more than it saves, and running on the loop serialises the
    transactions, which is what keeps the lease logic free of races without extra locks.
    """

    def __init__(self, path: Path | str, *, default_max_attempts: int = 3) -> None:
        self.path = Path(path)
        self.default_max_attempts = default_max_attempts
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Autocommit mode: transactions are opened explicitly by _tx().
        self._db = sqlite3.connect(str(self.path), isolation_level=None)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute("PRAGMA foreign_keys=ON")
        self._db.execute("PRAGMA busy_timeout=5000")
        self._migrate()
        # Blobs that no result names and no upload is writing (after a crash mid-upload).
        self._db.execute(
            "INSERT OR IGNORE INTO garbage_blobs(blob_id) SELECT DISTINCT blob_id"
            " FROM blob_chunks WHERE blob_id NOT IN (SELECT blob_id FROM results)"
        )

    # ------------------------------------------------------------------ plumbing

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _tx(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def _migrate(self) -> None:
        version = int(self._db.execute("PRAGMA user_version").fetchone()[0])
        if version == SCHEMA_VERSION:
            return
        if version > SCHEMA_VERSION:
            raise StoreError(
                f"{self.path} has schema version {version}; this pool knows up to "
                f"{SCHEMA_VERSION}: use a newer hivemind-worker"
            )
        with self._tx() as db:
            # Each step takes the schema one version up; v1 -> v2 copies stored results once.
            for step, script in ((1, _SCHEMA_V1), (2, _MIGRATE_V2)):
                if version < step:
                    for statement in _statements(script):
                        db.execute(statement)
            db.execute(f"PRAGMA user_version={SCHEMA_VERSION}")

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

    # ------------------------------------------------------------ users, tokens

    def add_user(self, username: str, password: str) -> bool:
        """Create the user, or set a new password and revoke its sessions; True if created."""
        stored = hash_password(password)
        with self._tx() as db:
            exists = db.execute("SELECT 1 FROM users WHERE username = ?", (username,)).fetchone()
            if exists:
                db.execute("UPDATE users SET password = ? WHERE username = ?", (stored, username))
                db.execute("DELETE FROM tokens WHERE username = ?", (username,))
                return False
            db.execute(
                "INSERT INTO users(username, password, created_ms) VALUES(?, ?, ?)",
                (username, stored, now_ms()),
            )
            return True

    def password_hash(self, username: str) -> str | None:
        row = self._db.execute(
            "SELECT password FROM users WHERE username = ?", (username,)
        ).fetchone()
        return None if row is None else str(row["password"])

    def check_password(self, username: str, password: str) -> bool:
        return verify_password(password, self.password_hash(username))

    def issue_token(self, username: str, ttl_seconds: int) -> tuple[str, int]:
        """A new session token and its expiry (unix ms); only its sha256 is stored."""
        token = secrets.token_urlsafe(32)
        now = now_ms()
        expires = now + ttl_seconds * 1000
        with self._tx() as db:
            db.execute("DELETE FROM tokens WHERE expires_ms <= ?", (now,))
            db.execute(
                "INSERT INTO tokens(token_sha256, username, expires_ms) VALUES(?, ?, ?)",
                (_token_digest(token), username, expires),
            )
        return token, expires

    def token_user(self, token: str, now: int | None = None) -> str | None:
        """The user a token belongs to; None if unknown, TokenExpired if expired."""
        row = self._db.execute(
            "SELECT username, expires_ms FROM tokens WHERE token_sha256 = ?",
            (_token_digest(token),),
        ).fetchone()
        if row is None:
            return None
        if int(row["expires_ms"]) <= (now if now is not None else now_ms()):
            raise TokenExpired()
        return str(row["username"])

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

    def get_node(self, node_id: str, owner: str) -> NodeRecord:
        """The node, checked to belong to `owner`; NodeNotFound / NodeOwnedByOther otherwise."""
        row = self._db.execute("SELECT * FROM nodes WHERE node_id = ?", (node_id,)).fetchone()
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

    def record_heartbeat(
        self, node_id: str, status: int, metrics: dict[str, float], status_message: str = ""
    ) -> None:
        """Note that the node is alive, with its status (and why, when it says) and metrics."""
        kept: dict[str, float | str] = dict(metrics)
        if status_message:
            kept["status_message"] = status_message
        with self._tx() as db:
            db.execute(
                "UPDATE nodes SET last_seen_ms = ?, status = ?, metrics = ? WHERE node_id = ?",
                (now_ms(), status, json.dumps(kept), node_id),
            )
            self._bump(db, "heartbeats")

    # -------------------------------------------------------------------- tasks

    def submit(self, task: TaskSpec, owner: str, now: int | None = None) -> str:
        """Queue a validated task; assigns a uuid4 hex id if it has none."""
        task_id = task.task_id or uuid.uuid4().hex
        spec = task.to_proto()
        spec.task_id = task_id
        spec.lease_id = ""
        spec.attempt = 0
        max_attempts = task.max_attempts or self.default_max_attempts
        spec.max_attempts = max_attempts
        res = task.resources
        try:
            with self._tx() as db:
                db.execute(
                    "INSERT INTO tasks(task_id, owner, spec, kind, cpus, memory_bytes, disk_bytes,"
                    " gpus, max_result_bytes, status, attempt, max_attempts, submitted_ms)"
                    " VALUES(?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 1, ?, ?)",
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
                        now if now is not None else now_ms(),
                    ),
                )
                self._bump(db, "submitted")
        except sqlite3.IntegrityError:
            raise DuplicateTask(f"task {task_id} already exists") from None
        return task_id

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
        """
        caps = set(capabilities)
        kinds = [k.value for k, needs in KIND_CAPABILITIES.items() if needs & caps]
        if not kinds or max_tasks <= 0:
            return []
        now = now if now is not None else now_ms()
        expires = now + int(lease_seconds * 1000)
        remaining = free
        leased: list[pb.TaskSpec] = []
        with self._tx() as db:
            marks = ",".join("?" * len(kinds))
            rows = db.execute(
                "SELECT task_id, spec, cpus, memory_bytes, disk_bytes, gpus, attempt FROM tasks"
                f" WHERE status = ? AND kind IN ({marks})"
                " AND cpus <= ? AND memory_bytes <= ? AND disk_bytes <= ? AND gpus <= ?"
                " ORDER BY submitted_ms, seq",
                (
                    TaskStatus.QUEUED.value,
                    *kinds,
                    free.cpus + 1e-9,
                    free.memory_bytes,
                    free.disk_bytes,
                    free.gpus,
                ),
            )
            for row in rows.fetchall():
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
                lease_id = uuid.uuid4().hex
                db.execute(
                    "UPDATE tasks SET status = ?, node_id = ?, lease_id = ?, lease_expires_ms = ?,"
                    " started_ms = ? WHERE task_id = ?",
                    (TaskStatus.RUNNING.value, node_id, lease_id, expires, now, row["task_id"]),
                )
                spec.lease_id = lease_id
                spec.attempt = int(row["attempt"])
                leased.append(spec)
                remaining = remaining - need
                if len(leased) >= max_tasks:
                    break
            if leased:
                self._bump(db, "leased", len(leased))
        return leased

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
        expires = now + int(lease_seconds * 1000)
        usage = usage or {}
        lost: list[str] = []
        with self._tx() as db:
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
                "SELECT task_id, attempt, max_attempts, node_id, cancel_requested FROM tasks"
                " WHERE status = ? AND lease_expires_ms <= ?",
                (TaskStatus.RUNNING.value, now),
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

    def cancels_for(self, node_id: str) -> list[str]:
        rows = self._db.execute(
            "SELECT task_id FROM tasks WHERE node_id = ? AND status = ? AND cancel_requested = 1",
            (node_id, TaskStatus.RUNNING.value),
        ).fetchall()
        return [str(r["task_id"]) for r in rows]

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
        now: int | None = None,
    ) -> ReportOutcome:
        """Record a worker's final report for its lease; idempotent per lease.

        CANCELLED wins over whatever the worker says once the submitter asked to cancel. A
        CANCELLED report nobody asked for means the worker gave the task back (it stopped or
        was drained): the task is requeued like an expired lease, attempt + 1.
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

    # ------------------------------------------------------------------ results

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


def _task_record(row: sqlite3.Row) -> TaskRecord:
    return TaskRecord(
        task_id=str(row["task_id"]),
        owner=str(row["owner"]),
        spec=pb.TaskSpec.FromString(row["spec"]),
        status=TaskStatus(row["status"]),
        attempt=int(row["attempt"]),
        max_attempts=int(row["max_attempts"]),
        node_id=str(row["node_id"] or ""),
        lease_id=str(row["lease_id"] or ""),
        lease_expires_ms=int(row["lease_expires_ms"] or 0),
        cancel_requested=bool(row["cancel_requested"]),
        exit_code=int(row["exit_code"]),
        error=str(row["error"]),
        log_tail=bytes(row["log_tail"]),
        result_sha256=str(row["result_sha256"]),
        result_size=int(row["result_size"]),
        submitted_ms=int(row["submitted_ms"]),
        started_ms=int(row["started_ms"]),
        finished_ms=int(row["finished_ms"]),
        usage=json.loads(row["usage"]),
    )
