"""The first-run flow, from an empty data folder to "Contributing", with the keyboard alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from PySide6.QtCore import Qt
from PySide6.QtWidgets import QApplication, QWidget

from helpers.guikit import make_world
from helpers.harness import PASSWORD, USER, start_pool
from hivemind_worker.config import load_settings
from hivemind_worker.engine.events import EngineState
from hivemind_worker.gui.app import WorkerApp


@pytest.fixture(autouse=True)
def _no_real_autostart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def test_first_run_from_an_empty_folder_to_contributing_by_keyboard(
    qtbot, tmp_path: Path, memory_keyring
) -> None:
    home = tmp_path / "home"
    world = make_world(home, "127.0.0.1:50051", account="")
    assert not world.paths.settings_file.exists()
    assert not memory_keyring.passwords  # never signed in

    async def before() -> None:
        world.pool = await start_pool(tmp_path / "pool.db")

    async def after() -> None:
        if world.pool is not None:
            await world.pool.stop()

    app = WorkerApp(world.settings, world.paths, world.credentials, world.engine,
                    autostart_engine=False, before=before, after=after, show_tray=False,
                    exit_on_quit=False)  # fmt: skip
    app.open_setup()  # what run_gui does when there is no settings file yet
    app.start_engine(show_dashboard=False)
    assert not app.dashboard.isVisible()
    qtbot.waitUntil(lambda: world.pool is not None and world.pool.port > 0, timeout=20_000)
    assert world.pool is not None
    address = world.pool.address

    def focus() -> QWidget:
        widget = QApplication.focusWidget()
        assert widget is not None
        return widget

    def type_text(text: str) -> None:
        qtbot.keyClicks(focus(), text)

    def press(key: Qt.Key) -> None:
        qtbot.keyClick(focus(), key)

    try:
        wizard = app.setup
        assert wizard is not None
        qtbot.waitUntil(lambda: QApplication.focusWidget() is not None, timeout=5_000)
        # 1. What HiveMind is.
        assert wizard.currentPage() is wizard.welcome
        press(Qt.Key.Key_Return)
        # 2. The pool and signing in; Next stays off until signed in.
        qtbot.waitUntil(lambda: wizard.currentPage() is wizard.pool, timeout=5_000)
        assert focus() is wizard.pool.address
        type_text(address)  # replaces the selected default
        press(Qt.Key.Key_Tab)  # Test connection
        assert focus() is wizard.pool.test_button
        press(Qt.Key.Key_Space)
        qtbot.waitUntil(
            lambda: "Reached the pool" in wizard.pool.test_result.text(), timeout=15_000
        )
        press(Qt.Key.Key_Tab)
        assert focus() is wizard.pool.account
        type_text(USER)
        press(Qt.Key.Key_Return)  # not signed in yet: Enter does not leave the page
        assert wizard.currentPage() is wizard.pool
        press(Qt.Key.Key_Tab)
        assert focus() is wizard.pool.password
        type_text(PASSWORD)
        press(Qt.Key.Key_Return)  # signs in
        qtbot.waitUntil(lambda: wizard.pool.signed_in == USER, timeout=15_000)
        assert "Signed in as alice" in wizard.pool.result.text()
        press(Qt.Key.Key_Return)  # Next
        # 3. What to give: this machine's numbers, suggested values that are valid.
        qtbot.waitUntil(lambda: wizard.currentPage() is wizard.give, timeout=5_000)
        assert "processor cores" in wizard.give.subTitle()
        cpu = focus()
        assert cpu is wizard.give.fields["max_cpu_cores"]
        qtbot.keyClick(cpu, Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
        type_text("lots")
        press(Qt.Key.Key_Return)  # refused beside the field; the page stays
        assert wizard.currentPage() is wizard.give
        assert wizard.give.errors["max_cpu_cores"].text().startswith("expected")
        qtbot.keyClick(cpu, Qt.Key.Key_A, Qt.KeyboardModifier.ControlModifier)
        type_text("1")
        press(Qt.Key.Key_Return)
        # 4. When; 5. Docker or the sandbox; 6. Done.
        qtbot.waitUntil(lambda: wizard.currentPage() is wizard.when, timeout=5_000)
        press(Qt.Key.Key_Space)  # do not start at login
        assert not wizard.when.start_at_login.isChecked()
        press(Qt.Key.Key_Return)
        qtbot.waitUntil(lambda: wizard.currentPage() is wizard.docker, timeout=5_000)
        press(Qt.Key.Key_Return)
        qtbot.waitUntil(lambda: wizard.currentPage() is wizard.done_page, timeout=5_000)
        press(Qt.Key.Key_Return)  # Finish, with "Start contributing now" ticked
        qtbot.waitUntil(lambda: app.model.state is EngineState.IDLE, timeout=30_000)
        assert app.dashboard.state_label.text() == "Contributing: waiting for work"
        assert app.dashboard.isVisible()
        saved = load_settings(world.paths, env={})
        assert saved.node_pool_address == address and saved.account == USER
        assert saved.max_cpu_cores == 1.0 and saved.start_at_login is False
        assert any(USER in user for _, user in memory_keyring.passwords)
    finally:
        world.engine.shutdown()
        app.engine_thread.wait(30_000)
        app.model.flush()
        app.dispose()
        qtbot.wait(50)
