"""The only place secrets live: pool tokens in the OS keyring, plaintext only as a loud fallback."""

from __future__ import annotations

import contextlib
import logging
import os
import sys
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import keyring
import keyring.backends.chainer
import keyring.backends.fail
import keyring.core
import keyring.errors
from keyring.backend import KeyringBackend

from hivemind_worker.config import read_state, update_state
from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.paths import Paths

log = logging.getLogger(__name__)

SERVICE = "hivemind-worker"
PLAINTEXT_FILE = "credentials.cfg"

_T = TypeVar("_T")


class CredentialError(HiveMindError):
    """The keyring could not store or return a token; str() is a message for the person."""

    kind = ErrorKind.KEYRING
    title = "Keyring unavailable"


def _is_recommended(backend: KeyringBackend) -> bool:
    """True for a real OS keyring; False for the fail backend and for keyrings.alt's file stores."""
    if isinstance(backend, keyring.backends.chainer.ChainerBackend):
        return any(_is_recommended(chained) for chained in backend.backends)
    if isinstance(backend, keyring.backends.fail.Keyring):
        return False
    try:
        return bool(keyring.core.recommended(backend))
    except RuntimeError:  # a backend's priority raises when it cannot work here
        return False


class CredentialStore:
    """Session tokens per (pool, account), behind one lock; the backend is chosen on first use.

    Every call blocks (D-Bus, Windows Credential Manager, file I/O): call it off the event loop
    and off the GUI thread.
    """

    def __init__(self, paths: Paths, *, allow_plaintext_fallback: bool = True) -> None:
        self._paths = paths
        self._allow_plaintext_fallback = allow_plaintext_fallback
        self._lock = threading.RLock()
        self._backend: KeyringBackend | None = None
        self._plaintext_path: str | None = None

    @property
    def backend_name(self) -> str:
        with self._lock:
            backend = self._load()
            if self._plaintext_path is not None:
                return f"PlaintextKeyring (file {self._plaintext_path})"
            if isinstance(backend, keyring.backends.chainer.ChainerBackend):
                # Name what stores secrets: keyring also chains low-priority fallbacks.
                real = [b for b in backend.backends if _is_recommended(b)] or backend.backends
                return ", ".join(b.name for b in real)
            return str(backend.name)

    @property
    def is_plaintext_fallback(self) -> bool:
        with self._lock:
            self._load()
            return self._plaintext_path is not None

    def get_token(self, pool_address: str, account: str) -> str | None:
        def read(backend: KeyringBackend) -> str | None:
            return backend.get_password(SERVICE, _user(pool_address, account))

        return self._call("read", pool_address, account, read)

    def set_token(self, pool_address: str, account: str, token: str) -> None:
        def store(backend: KeyringBackend) -> None:
            backend.set_password(SERVICE, _user(pool_address, account), token)

            def remember(state: dict[str, Any]) -> None:
                accounts = state.get("accounts")
                state["accounts"] = {
                    **(accounts if isinstance(accounts, dict) else {}),
                    pool_address: account,
                }

            update_state(self._paths, remember)

        self._call("save", pool_address, account, store)

    def delete_token(self, pool_address: str, account: str) -> None:
        def delete(backend: KeyringBackend) -> None:
            # Raised when the token is already absent, which is what the caller wants.
            with contextlib.suppress(keyring.errors.PasswordDeleteError):
                backend.delete_password(SERVICE, _user(pool_address, account))

        self._call("delete", pool_address, account, delete)

    def last_account(self, pool_address: str) -> str | None:
        """The account last logged in to `pool_address`; kept in the state file, not a secret."""
        accounts = read_state(self._paths).get("accounts")
        account = accounts.get(pool_address) if isinstance(accounts, dict) else None
        return account if isinstance(account, str) else None

    def _call(
        self,
        verb: str,
        pool_address: str,
        account: str,
        operation: Callable[[KeyringBackend], _T],
    ) -> _T:
        with self._lock:
            backend = self._load()
            try:
                return operation(backend)
            except Exception as exc:
                message = (
                    f"Could not {verb} the token for {_user(pool_address, account)} "
                    f"in {self.backend_name}: {str(exc) or type(exc).__name__}"
                )
                if isinstance(exc, keyring.errors.KeyringLocked):
                    message += " (unlock it by logging in to the desktop session, then try again)"
                raise CredentialError(message) from exc

    def _load(self) -> KeyringBackend:
        if self._backend is not None:
            return self._backend
        try:
            backend = _system_keyring()
        except Exception as exc:
            raise CredentialError(f"Could not open the system keyring: {exc}") from exc
        if not _is_recommended(backend):
            if not self._allow_plaintext_fallback:
                raise CredentialError(
                    "No system keyring is available: install and unlock gnome-keyring or "
                    "KWallet (on Windows the Credential Manager is always present); "
                    f"found only {backend.name!r}"
                )
            backend = self._plaintext_backend()
        self._backend = backend
        return backend

    def _plaintext_backend(self) -> KeyringBackend:
        from keyrings.alt.file import PlaintextKeyring

        path = self._paths.data_dir / PLAINTEXT_FILE
        try:
            self._paths.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(path, os.O_CREAT | os.O_WRONLY, 0o600))
            os.chmod(path, 0o600)
        except OSError as exc:
            raise CredentialError(f"Could not create the token file {path}: {exc}") from exc
        backend: KeyringBackend = PlaintextKeyring()
        backend.file_path = str(path)  # type: ignore[attr-defined]
        self._plaintext_path = str(path)
        log.warning(
            "No system keyring is available, so pool tokens are stored in PLAINTEXT at %s. "
            "For a real keyring, install and unlock gnome-keyring or KWallet "
            "(on Windows the Credential Manager is always present).",
            path,
        )
        return backend


def _system_keyring() -> KeyringBackend:
    """keyring's own choice of backend.

    On Linux without a session bus the Secret Service cannot be reached (jeepney finds the
    bus only through DBUS_SESSION_BUS_ADDRESS), so keyring's Secret Service backend is loaded
    without secretstorage then: it reports itself unusable, exactly as it would after trying,
    and secretstorage with cryptography (about 8 MiB of a headless worker's memory) stays
    unloaded. With a session bus nothing changes.
    """
    if sys.platform != "linux" or os.environ.get("DBUS_SESSION_BUS_ADDRESS"):
        return keyring.get_keyring()
    hide = "secretstorage" not in sys.modules
    if hide:
        sys.modules["secretstorage"] = None  # type: ignore[assignment]  # import -> ImportError
    try:
        return keyring.get_keyring()
    finally:
        if hide and sys.modules.get("secretstorage", False) is None:
            del sys.modules["secretstorage"]


def _user(pool_address: str, account: str) -> str:
    return f"{account}@{pool_address}"
