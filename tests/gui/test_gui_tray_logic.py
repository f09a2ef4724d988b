"""Tray decisions that need no X server: which errors notify, snooze times, distinct icons."""

from __future__ import annotations

from datetime import datetime

from hivemind_worker.config import ConfigError
from hivemind_worker.credentials import CredentialError
from hivemind_worker.engine.events import EngineState, ErrorRaised
from hivemind_worker.engine.outbox import OutboxFull
from hivemind_worker.engine.pool_client import AuthError, PoolUnavailable, StaleLeaseError
from hivemind_worker.errors import ErrorKind, HiveMindError
from hivemind_worker.gui.icons import Look, draw, look_for
from hivemind_worker.gui.tray import needs_person, tomorrow_morning
from hivemind_worker.tasks import TaskSpecError


def test_the_notification_follows_the_error_kind_not_its_words() -> None:
    notify = [
        AuthError("Login needed", "The pool refused the login; sign in again."),
        CredentialError("The keyring is locked."),
        OutboxFull("The result spool is full."),
        ConfigError("max_cpu_cores: expected a number"),
        HiveMindError("Docker is not running.", kind=ErrorKind.DOCKER_MISSING),
    ]
    quiet = [
        # An address with "docker" in it, and words such as "login" and "disk", decide nothing.
        PoolUnavailable("Node Pool unreachable", "Can't reach the pool at docker-login.lan:50051."),
        StaleLeaseError("Lease no longer valid", "the disk task was re-queued"),
        TaskSpecError("image", "docker image name not valid"),
    ]
    for error in notify:
        assert needs_person(ErrorRaised.of(error)), error
    for error in quiet:
        assert not needs_person(ErrorRaised.of(error)), error


def test_until_tomorrow_means_eight_in_the_morning() -> None:
    assert tomorrow_morning(datetime(2026, 3, 7, 23, 30)) == datetime(2026, 3, 8, 8, 0)
    assert tomorrow_morning(datetime(2026, 12, 31, 0, 5)) == datetime(2027, 1, 1, 8, 0)


def test_every_look_has_its_own_icon_and_every_state_a_look(qapp) -> None:
    images = {look: draw(look, 32) for look in Look}
    assert len({bytes(img.constBits()) for img in images.values()}) == len(Look)
    assert {look_for(state) for state in EngineState} == set(Look)
    for size in (16, 22, 64):  # drawn at each size, not scaled from one bitmap
        assert draw(Look.ERROR, size).width() == size
