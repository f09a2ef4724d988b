"""Tests for hivemind_worker.credentials."""

from __future__ import annotations

import logging
import stat
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import keyring
import keyring.backends.fail
import keyring.errors
import pytest
from keyring.backend import KeyringBackend
from keyrings.alt.file import PlaintextKeyring

from hivemind_worker.credentials import SERVICE, CredentialError, CredentialStore
from hivemind_worker.paths import Paths, default_paths

POOL = "pool.example.org:443"


@pytest.fixture
def paths(tmp_path: Path) -> Paths:
    return default_paths(tmp_path / "home")


@pytest.fixture
def use_backend() -> Iterator[Callable[[KeyringBackend], None]]:
    previous = keyring.get_keyring()
    yield keyring.set_keyring
    keyring.set_keyring(previous)


class LockedKeyring(KeyringBackend):
    priority = 1
    viable = False

    def get_password(self, service: str, username: str) -> str | None:
        raise keyring.errors.KeyringLocked("Failed to unlock the collection!")

    set_password = delete_password = get_password  # type: ignore[assignment]


def test_round_trip_in_the_system_keyring(paths: Paths, memory_keyring: KeyringBackend) -> None:
    store = CredentialStore(paths)
    assert store.get_token(POOL, "alice") is None
    assert store.last_account(POOL) is None
    store.set_token(POOL, "alice", "secret-1")
    assert memory_keyring.get_password(SERVICE, f"alice@{POOL}") == "secret-1"
    assert store.get_token(POOL, "alice") == "secret-1"
    assert store.get_token(POOL, "bob") is None
    assert store.last_account(POOL) == "alice"
    assert store.last_account("other:1") is None
    assert not store.is_plaintext_fallback
    assert store.backend_name == type(memory_keyring).name

    store.delete_token(POOL, "alice")
    store.delete_token(POOL, "alice")  # absent: no error
    assert store.get_token(POOL, "alice") is None
    assert "secret-1" not in paths.state_file.read_text(encoding="utf-8")


def test_last_account_keeps_other_pools_and_state(
    paths: Paths, memory_keyring: KeyringBackend
) -> None:
    paths.data_dir.mkdir(parents=True)
    paths.state_file.write_text('{"node_id": "node-x"}', encoding="utf-8")
    store = CredentialStore(paths)
    store.set_token(POOL, "alice", "t1")
    store.set_token("other:1", "bob", "t2")
    store.set_token(POOL, "carol", "t3")
    assert store.last_account(POOL) == "carol"
    assert store.last_account("other:1") == "bob"
    assert '"node_id": "node-x"' in paths.state_file.read_text(encoding="utf-8")


def test_plaintext_fallback_warns_and_works(
    paths: Paths,
    use_backend: Callable[[KeyringBackend], None],
    caplog: pytest.LogCaptureFixture,
) -> None:
    use_backend(keyring.backends.fail.Keyring())
    store = CredentialStore(paths)
    with caplog.at_level(logging.WARNING):
        store.set_token(POOL, "alice", "secret-2")
        assert store.get_token(POOL, "alice") == "secret-2"
    token_file = paths.data_dir / "credentials.cfg"
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    assert "PLAINTEXT" in warnings[0].getMessage()
    assert str(token_file) in warnings[0].getMessage()
    assert store.is_plaintext_fallback
    assert store.backend_name == f"PlaintextKeyring (file {token_file})"
    if sys.platform != "win32":
        assert stat.S_IMODE(token_file.stat().st_mode) == 0o600
    assert CredentialStore(paths).get_token(POOL, "alice") == "secret-2"


def test_auto_detected_plaintext_keyring_is_a_fallback_too(
    paths: Paths, use_backend: Callable[[KeyringBackend], None], tmp_path: Path
) -> None:
    stray = PlaintextKeyring()
    stray.file_path = str(tmp_path / "stray.cfg")
    use_backend(stray)
    store = CredentialStore(paths)
    store.set_token(POOL, "alice", "secret-3")
    assert store.is_plaintext_fallback
    assert (paths.data_dir / "credentials.cfg").exists()
    assert not (tmp_path / "stray.cfg").exists()


def test_no_fallback_means_an_error(
    paths: Paths, use_backend: Callable[[KeyringBackend], None]
) -> None:
    use_backend(keyring.backends.fail.Keyring())
    store = CredentialStore(paths, allow_plaintext_fallback=False)
    with pytest.raises(CredentialError, match=r"^No system keyring is available: .*gnome-keyring"):
        store.get_token(POOL, "alice")
    assert not (paths.data_dir / "credentials.cfg").exists()


def test_keyring_errors_become_credential_errors(
    paths: Paths, use_backend: Callable[[KeyringBackend], None]
) -> None:
    use_backend(LockedKeyring())
    store = CredentialStore(paths)
    with pytest.raises(CredentialError) as info:
        store.get_token(POOL, "alice")
    assert str(info.value) == (
        f"Could not read the token for alice@{POOL} in {LockedKeyring.name}: "
        "Failed to unlock the collection! (unlock it by logging in to the desktop session, "
        "then try again)"
    )
    assert isinstance(info.value.__cause__, keyring.errors.KeyringError)
