"""The store's users and session tokens: scrypt password hashes, tokens kept only as sha256."""

from __future__ import annotations

import secrets

from hivemind_worker.pool.records import (
    TokenExpired,
    _token_digest,
    hash_password,
    now_ms,
    verify_password,
)
from hivemind_worker.pool.results import ResultStore


class UserStore(ResultStore):
    """Users and their session tokens (and, below it, result blobs and the connection)."""

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
        """The user a token belongs to; None if unknown, TokenExpired if expired.

        Read every time (about 12 us), never cached: a password changed by `hivemind-pool
        add-user` from another process signs the old sessions out at once.
        """
        row = self._db.execute(
            "SELECT username, expires_ms FROM tokens WHERE token_sha256 = ?",
            (_token_digest(token),),
        ).fetchone()
        if row is None:
            return None
        if int(row["expires_ms"]) <= (now if now is not None else now_ms()):
            raise TokenExpired()
        return str(row["username"])
