"""The store's users and session tokens: scrypt password hashes, tokens kept only as sha256."""

from __future__ import annotations

import secrets
import time
from pathlib import Path

from hivemind_worker.pool.records import (
    TokenExpired,
    _token_digest,
    hash_password,
    now_ms,
    verify_password,
)
from hivemind_worker.pool.results import ResultStore

#: How often the caches ask SQLite whether another process wrote to the database.
RECHECK_SECONDS = 1.0
MAX_CACHED_TOKENS = 100_000


class UserStore(ResultStore):
    """Users and their session tokens (and, below it, result blobs and the connection)."""

    # Tokens verified, as token -> (username, expires unix ms): every worker call carries its
    # token, and hashing it and reading its row on each one was a measurable share of a
    # heartbeat. Dropped whenever this store revokes sessions (add_user) and whenever another
    # process has committed to the database (PRAGMA data_version, asked at most every
    # RECHECK_SECONDS, `_check_external_writes`): `hivemind-pool add-user` run beside a live
    # pool signs the old sessions out within a second.
    def __init__(self, path: Path | str) -> None:
        super().__init__(path)
        self._tokens: dict[str, tuple[str, int]] = {}
        self._data_version = -1
        self._data_checked = float("-inf")

    def add_user(self, username: str, password: str) -> bool:
        """Create the user, or set a new password and revoke its sessions; True if created."""
        stored = hash_password(password)
        self._tokens.clear()
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
        self._check_external_writes()
        cache = self._tokens
        hit = cache.get(token)
        if hit is None:
            row = self._db.execute(
                "SELECT username, expires_ms FROM tokens WHERE token_sha256 = ?",
                (_token_digest(token),),
            ).fetchone()
            if row is None:
                return None
            hit = (str(row["username"]), int(row["expires_ms"]))
            if len(cache) >= MAX_CACHED_TOKENS:
                cache.clear()
            cache[token] = hit
        if hit[1] <= (now if now is not None else now_ms()):
            raise TokenExpired()
        return hit[0]

    def _check_external_writes(self) -> None:
        """Drop what is cached if another process committed since (asked at most each second)."""
        clock = time.monotonic()
        if clock - self._data_checked < RECHECK_SECONDS:
            return
        self._data_checked = clock
        version = int(self._db.execute("PRAGMA data_version").fetchone()[0])
        if version != self._data_version:
            self._data_version = version
            self._drop_caches()

    def _drop_caches(self) -> None:
        self._tokens.clear()
