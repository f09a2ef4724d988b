"""When to contribute in the GUI (issue 11, items 5-6): the settings page, and the header,
tray and Resume while the policy holds the tasks, decided by the real engine's policy loop.
"""

from __future__ import annotations

from datetime import datetime, timedelta

import pytest
from PySide6.QtCore import Qt

from helpers.guikit import LoopPool
from hivemind_worker.config import load_settings
from hivemind_worker.engine.events import EngineState
from hivemind_worker.engine.policy import Reason, Verdict
from hivemind_worker.gui.app import WorkerApp
from hivemind_worker.gui.icons import Look
from hivemind_worker.gui.policy_page import ALWAYS, AWAY, CUSTOM


@pytest.fixture(autouse=True)
def _no_real_autostart(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def test_when_to_contribute_page_presets_and_errors_beside_the_field(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    app, _ = gui_app
    app.open_settings()
    dialog = app.settings_dialog
    assert dialog is not None and dialog.policy is not None
    page = dialog.policy
    dialog.tabs.setCurrentWidget(page)  # the person opens the page (errors show on it)
    ok = dialog.buttons.button(dialog.buttons.StandardButton.Ok)
    assert page.preset.currentText() == ALWAYS  # the defaults are the courteous preset
    page.preset.setCurrentText(AWAY)
    page._preset_chosen(page.preset.currentIndex())
    assert page.fields["idle_only_minutes"].text() == "5"
    page.fields["schedule"].setText("mon-fri 18:00-08:00; sat-sun 00:00-24:00")
    assert page.preset.currentText() == CUSTOM
    for key, bad in (("schedule", "sometimes"), ("other_cpu_percent", "250"),
                     ("cpu_time_percent", "0")):  # fmt: skip
        before = page.fields[key].text()
        page.fields[key].setText(bad)
        assert page.fields[key].text() == bad  # never changed behind the person's back
        assert page._error_labels[key].isVisibleTo(dialog), key
        assert not ok.isEnabled() and not dialog.apply()
        page.fields[key].setText(before)
    assert ok.isEnabled()
    assert dialog.apply()
    saved = load_settings(app.paths, env={})
    assert saved.idle_only_minutes == 5
    assert saved.schedule.startswith("mon-fri")


def schedule_excluding_now() -> tuple[str, str]:
    """A daily window that starts an hour from now: now is outside it. Returns the schedule
    and the clock time it resumes at (a window past midnight is allowed: 23:30 -> 00:30)."""
    start = datetime.now() + timedelta(hours=1)
    end = start + timedelta(hours=1)
    at = f"{start:%H:%M}"
    return f"mon-sun {at}-{end:%H:%M}", at


def test_a_schedule_set_in_settings_holds_the_tasks_with_its_reason_and_until_when(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    # The real engine's policy loop decides (no hand-made events): the person sets a schedule
    # that leaves out the present in Settings → When to contribute, and presses Start.
    app, _ = gui_app
    schedule, resumes = schedule_excluding_now()
    app.open_settings()
    dialog = app.settings_dialog
    assert dialog is not None
    dialog.tabs.setCurrentWidget(dialog.policy)
    dialog.policy.fields["schedule"].setText(schedule)
    assert dialog.policy.preset.currentText() == CUSTOM
    ok = dialog.buttons.button(dialog.buttons.StandardButton.Ok)
    qtbot.mouseClick(ok, Qt.MouseButton.LeftButton)
    assert load_settings(app.paths, env={}).schedule == schedule
    app.start()

    headline = "Paused: outside your schedule"
    qtbot.waitUntil(lambda: app.dashboard.state_label.text() == headline, timeout=20_000)
    assert app.model.state is EngineState.WAITING
    policy = app.model.policy
    assert policy is not None
    assert policy.decision.verdict is Verdict.SUSPEND
    assert policy.decision.reason is Reason.SCHEDULE
    assert f"Resumes at {resumes}" in app.dashboard.state_detail.text()
    tooltip = app.tray.tooltip_text()
    assert headline in tooltip and resumes in tooltip
    assert app.status().look is Look.WAITING
    assert app.tray.look is Look.WAITING  # the tray icon, and its menu, follow
    assert app.tray.status_action.text() == headline
    assert app.tray.resume_action.isVisible()
    assert app.dashboard.main_button.text() == "Resume"
    assert any("outside your schedule" in e.text for e in app.model.log)

    app.dashboard.main_button.click()  # Resume explains and offers to contribute anyway
    box = app.override_box
    assert box is not None and "outside your schedule" in box.text()
    anyway = box.buttons()[0]
    assert "Contribute anyway for 1 hour" in anyway.text().replace("&", "")
    anyway.click()
    # The engine's override lifts the hold: the header leaves "Paused" and says until when.
    qtbot.waitUntil(lambda: app.model.state is not EngineState.WAITING, timeout=20_000)
    qtbot.waitUntil(lambda: "Contributing anyway until" in app.dashboard.state_detail.text(),
                    timeout=20_000)  # fmt: skip
    assert app.status().look is not Look.WAITING
