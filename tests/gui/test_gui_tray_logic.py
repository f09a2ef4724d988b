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
    looks = {look_for(state) for state in EngineState}
    looks |= {look_for(EngineState.CONNECTING, disconnected=True)}
    if "WAITING" not in EngineState.__members__:  # the policy's state (issue 11) not merged
        looks.add(Look.WAITING)
    assert looks == set(Look)
    # Stopped on purpose and cut off from the pool look different (bug 10).
    assert look_for(EngineState.STOPPED) is not look_for(EngineState.CONNECTING, disconnected=True)
    for size in (16, 22, 64):  # drawn at each size, not scaled from one bitmap
        assert draw(Look.ATTENTION, size).width() == size


def test_every_look_is_distinct_at_16_px_on_light_and_dark_panels(qapp) -> None:
    from PySide6.QtGui import QColor, QImage, QPainter

    for panel in ("#f0f0f0", "#2b2b2b"):
        seen = []
        for look in Look:
            image = QImage(16, 16, QImage.Format.Format_ARGB32)
            image.fill(QColor(panel))
            painter = QPainter(image)
            painter.drawImage(0, 0, draw(look, 16))
            painter.end()
            pixels = [image.pixelColor(x, y) for y in range(16) for x in range(16)]
            # The icon stands out from the panel: enough pixels far from the panel colour.
            bg = QColor(panel)
            far = [
                p for p in pixels
                if abs(p.red() - bg.red()) + abs(p.green() - bg.green())
                + abs(p.blue() - bg.blue()) > 120
            ]  # fmt: skip
            assert len(far) > 40, (look, panel, len(far))
            seen.append(bytes(image.constBits()))
        assert len(set(seen)) == len(Look)


def test_the_bridge_has_a_signal_for_every_engine_event_type() -> None:
    import typing

    from hivemind_worker.engine.events import Event
    from hivemind_worker.gui.engine_thread import SIGNALS, Bridge

    assert set(typing.get_args(Event)) == set(SIGNALS)
    for name in SIGNALS.values():
        assert hasattr(Bridge, name)
