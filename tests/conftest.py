"""Shared fixtures: an in-memory keyring for tests that must not touch the real one."""

from __future__ import annotations

import os
from collections.abc import Iterator

import keyring
import keyring.errors
import pytest
from keyring.backend import KeyringBackend

# The worker's "other programs are busy" rule reads the whole machine's CPU, which parallel
# test processes (and other people's, on a shared machine) load at random: workers started by
# tests (headless subprocesses, the GUI's engine) would pause for them. The tests of that
# rule set it themselves.
os.environ.setdefault("HIVEMIND_OTHER_CPU_PERCENT", "0")
# What hivemind_worker/__init__.py sets, set here too because gRPC reads it when it is first
# imported, and a test module may import grpc before hivemind_worker. With gRPC's fork handlers
# on, a child forked (not vforked: a root worker starts tasks as nobody) while gRPC calls are
# in flight can crash before it execs the task's launcher.
os.environ["GRPC_ENABLE_FORK_SUPPORT"] = "false"


class MemoryKeyring(KeyringBackend):
    """A keyring that forgets everything when the test ends."""

    priority = 1  # "recommended", like a real OS keyring
    viable = False  # never picked by keyring's own detection

    def __init__(self) -> None:
        super().__init__()
        self.passwords: dict[tuple[str, str], str] = {}

    def get_password(self, service: str, username: str) -> str | None:
        return self.passwords.get((service, username))

    def set_password(self, service: str, username: str, password: str) -> None:
        self.passwords[service, username] = password

    def delete_password(self, service: str, username: str) -> None:
        if self.passwords.pop((service, username), None) is None:
            raise keyring.errors.PasswordDeleteError("Password not found")


@pytest.fixture
def memory_keyring() -> Iterator[MemoryKeyring]:
    previous = keyring.get_keyring()
    backend = MemoryKeyring()
    keyring.set_keyring(backend)
    try:
        yield backend
    finally:
        keyring.set_keyring(previous)
