"""Tray decisions that need no X server: which errors notify, snooze times, distinct icons."""

from __future__ import annotations

from datetime import datetime

from hivemind_worker.engine.events import EngineState, ErrorRaised
from hivemind_worker.gui.icons import Look, draw, look_for
from hivemind_worker.gui.tray import needs_person, tomorrow_morning


def test_only_errors_that_need_the_person_notify() -> None:
    assert needs_person(ErrorRaised("Not logged in", "no login for the pool at x:1"))
    assert needs_person(ErrorRaised("Login expired", "log in again"))
    assert needs_person(ErrorRaised("Docker missing", "install Docker Desktop"))
    assert needs_person(ErrorRaised("Disk full", "no space left for task workspaces"))
    assert not needs_person(ErrorRaised("Node Pool unreachable", "retrying in 4 s"))


def test_until_tomorrow_means_eight_in_the_morning() -> None:
    assert tomorrow_morning(datetime(2026, 3, 7, 23, 30)) == datetime(2026, 3, 8, 8, 0)
    assert tomorrow_morning(datetime(2026, 12, 31, 0, 5)) == datetime(2027, 1, 1, 8, 0)


def test_every_look_has_its_own_icon_and_every_state_a_look(qapp) -> None:
    images = {look: draw(look, 32) for look in Look}
    assert len({bytes(img.constBits()) for img in images.values()}) == len(Look)
    assert {look_for(state) for state in EngineState} == set(Look)
    for size in (16, 22, 64):  # drawn at each size, not scaled from one bitmap
        assert draw(Look.ERROR, size).width() == size
