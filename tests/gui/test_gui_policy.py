"""When to contribute in the GUI (issue 11, items 5-6): the settings page, and the header,
tray and Resume while the policy holds the tasks.

They need the policy's settings and events (engine/policy.py, on wt-policy); until that
branch is merged they are skipped with that reason.
"""

from __future__ import annotations

import time

import pytest

from helpers.guikit import LoopPool
from hivemind_worker.config import load_settings
from hivemind_worker.engine import events
from hivemind_worker.gui.app import WorkerApp
from hivemind_worker.gui.policy_page import ALWAYS, AWAY, CUSTOM, policy_available

needs_policy = pytest.mark.skipif(
    not policy_available() or not hasattr(events, "PolicyChanged"),
    reason="issue 11's policy settings and PolicyChanged are not merged yet (wt-policy)",
)


@pytest.fixture(autouse=True)
def _no_real_autostart(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


@needs_policy
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


@needs_policy
def test_the_policy_reason_and_until_when_from_published_policy_events(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    # The events the engine's policy loop publishes, handed to the bridge as the engine hands
    # them (tests/integration/test_policy_engine runs the loop itself on real probes).
    from hivemind_worker.engine.policy import Decision, Reason, Verdict
    from hivemind_worker.gui.icons import Look

    app, _ = gui_app
    decision = Decision(Verdict.SUSPEND, Reason.ON_BATTERY, time.time(),
                        hint="resumes when plugged in")  # fmt: skip
    app.bridge.publish(events.PolicyChanged(decision, decision.line()))
    app.bridge.publish(events.StateChanged(events.EngineState.WAITING, "on battery"))
    qtbot.waitUntil(lambda: app.dashboard.state_label.text() == "Paused: on battery", timeout=5_000)
    assert "Resumes when plugged in" in app.dashboard.state_detail.text()
    assert "Paused: on battery" in app.tray.tooltip_text()
    assert app.status().look is Look.WAITING
    assert app.dashboard.main_button.text() == "Resume"
    app.dashboard.main_button.click()  # Resume explains and offers to contribute anyway
    box = app.override_box
    assert box is not None and "on battery" in box.text()
    assert "Contribute anyway for 1 hour" in box.buttons()[0].text().replace("&", "")
