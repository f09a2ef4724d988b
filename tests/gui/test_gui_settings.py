"""The settings dialog: round trip to the TOML file, inline errors, the engine, login, autostart."""

from __future__ import annotations

import os
import socket
import types
from pathlib import Path

import pytest
from PySide6.QtCore import Qt

from helpers.guikit import LoopPool
from helpers.harness import PASSWORD, USER
from hivemind_worker.config import load_settings, settings_table
from hivemind_worker.gui.app import WorkerApp
from hivemind_worker.gui.autostart import RUN_KEY, RUN_VALUE, WindowsRunKey, XdgAutostart
from hivemind_worker.gui.settings_dialog import SettingsDialog


def open_dialog(app: WorkerApp) -> SettingsDialog:
    app.open_settings()
    assert app.settings_dialog is not None
    return app.settings_dialog


def test_settings_round_trip_to_the_toml_file(qtbot, gui_app: tuple[WorkerApp, LoopPool]) -> None:
    app, _ = gui_app
    dialog = open_dialog(app)
    dialog.address.setText("pool.example.org:443")
    dialog.cpu_spin.setText("1.5")
    assert dialog.cpu_slider.value() == 15  # slider and field stay in step
    dialog.memory.setText("1")
    dialog.disk.setText("0.5")
    dialog.concurrent.setText("3")
    dialog.start_on_launch.setChecked(True)
    dialog.close_to_tray.setChecked(False)
    assert dialog.apply()

    saved = load_settings(app.paths, env={})
    assert saved.node_pool_address == "pool.example.org:443"
    assert saved.max_cpu_cores == 1.5
    assert saved.max_memory_gb == 1.0
    assert saved.max_concurrent_tasks == 3
    assert saved.start_on_launch is True
    assert saved.close_to_tray is False
    assert 'node_pool_address = "pool.example.org:443"' in app.paths.settings_file.read_text()

    # Opened again, the dialog shows what the file holds.
    dialog.reject()
    qtbot.waitUntil(lambda: app.settings_dialog is None)
    again = open_dialog(app)
    assert again.address.text() == "pool.example.org:443"
    assert again.cpu_spin.text() == "1.5"
    assert again.concurrent.text() == "3"
    assert not again.close_to_tray.isChecked()


def test_the_dialog_edits_the_settings_declared_for_the_gui(
    gui_app: tuple[WorkerApp, LoopPool],
) -> None:
    app, _ = gui_app
    dialog = open_dialog(app)
    assert sorted(dialog.raw_values()) == sorted(s.key for s in settings_table() if s.gui)


def test_invalid_values_are_flagged_and_never_saved(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    app, _ = gui_app
    dialog = open_dialog(app)
    ok = dialog.buttons.button(dialog.buttons.StandardButton.Ok)
    apply = dialog.buttons.button(dialog.buttons.StandardButton.Apply)
    for bad in ("no-port-here", "host:70000", "", "two words:80"):
        dialog.address.setText(bad)
        label = dialog._error_labels["node_pool_address"]
        assert label.isVisibleTo(dialog), bad
        assert "host:port" in label.text()
        assert not ok.isEnabled() and not apply.isEnabled()
        assert not dialog.test_button.isEnabled()
        assert dialog.address.accessibleDescription()  # announced, not only coloured
    dialog.address.setText("127.0.0.1:50051")
    dialog.account.setText("x" * 200)
    assert "at most 128 characters" in dialog._error_labels["account"].text()
    assert not dialog.apply()
    qtbot.mouseClick(apply, _left())  # disabled: does nothing
    assert not app.paths.settings_file.exists()
    dialog.account.setText(USER)
    assert ok.isEnabled() and not dialog._error_labels["account"].isVisibleTo(dialog)


def test_applying_reaches_the_running_engine_without_a_restart(
    qtbot, gui_app: tuple[WorkerApp, LoopPool]
) -> None:
    app, _ = gui_app
    thread_before = app.engine_thread
    dialog = open_dialog(app)
    dialog.concurrent.setText("2")
    dialog.cpu_spin.setText("0.5")
    qtbot.mouseClick(dialog.buttons.button(dialog.buttons.StandardButton.Ok), _left())
    qtbot.waitUntil(lambda: app.engine.settings.max_concurrent_tasks == 2, timeout=5_000)
    assert app.engine.settings.max_cpu_cores == 0.5
    assert app.engine_thread is thread_before and app.engine_thread.isRunning()
    assert app.settings.max_concurrent_tasks == 2
    assert "Settings applied" in app.dashboard.log_view.toPlainText()


def test_test_connection_and_login_run_off_the_gui_thread(
    qtbot, gui_app: tuple[WorkerApp, LoopPool], memory_keyring
) -> None:
    app, pool = gui_app
    assert pool.world.pool is not None
    address = pool.world.pool.address
    dialog = open_dialog(app)
    dialog.address.setText(address)
    qtbot.mouseClick(dialog.test_button, _left())
    qtbot.waitUntil(lambda: "Reached the pool" in dialog.test_result.text(), timeout=15_000)

    # A loopback port nobody listens on: a clear failure, never a frozen dialog.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        dead = f"127.0.0.1:{probe.getsockname()[1]}"
    dialog.address.setText(dead)
    qtbot.mouseClick(dialog.test_button, _left())
    qtbot.waitUntil(lambda: "Could not reach" in dialog.test_result.text(), timeout=30_000)

    # Log out what the fixture stored, then log in through the dialog.
    dialog.address.setText(address)
    dialog.account.setText(USER)
    dialog.refresh_login()
    qtbot.waitUntil(lambda: dialog.logged_in_as == USER, timeout=10_000)
    qtbot.mouseClick(dialog.logout_button, _left())
    qtbot.waitUntil(lambda: dialog.logged_in_as == "", timeout=10_000)
    assert not any(USER in user for _, user in memory_keyring.passwords)
    dialog.password.setText("wrong password")
    qtbot.mouseClick(dialog.login_button, _left())
    qtbot.waitUntil(lambda: "Login failed" in dialog.login_result.text(), timeout=15_000)
    dialog.password.setText(PASSWORD)
    with qtbot.waitSignal(dialog.loginChanged, timeout=15_000) as changed:
        qtbot.mouseClick(dialog.login_button, _left())
    assert changed.args == [USER]
    assert dialog.password.text() == ""  # the password is not kept anywhere
    assert any(USER in user for _, user in memory_keyring.passwords)
    assert PASSWORD not in memory_keyring.passwords.values()
    qtbot.waitUntil(lambda: dialog.logged_in_as == USER, timeout=10_000)


def test_start_at_login_writes_and_removes_the_xdg_autostart_entry(
    qtbot, gui_app: tuple[WorkerApp, LoopPool], tmp_path: Path
) -> None:
    app, _ = gui_app
    entry = Path(os.environ["XDG_CONFIG_HOME"]) / "autostart" / "hivemind-worker.desktop"
    dialog = open_dialog(app)
    dialog.start_at_login.setChecked(True)
    assert dialog.apply()
    text = entry.read_text()
    assert "Exec=" in text and "gui --hidden" in text and "Type=Application" in text
    dialog.start_at_login.setChecked(False)
    assert dialog.apply()
    assert not entry.exists()


def test_xdg_autostart_quotes_the_command(tmp_path: Path) -> None:
    auto = XdgAutostart(tmp_path, ["/opt/Hive Mind/hivemind-worker", "gui", "--hidden"])
    assert not auto.is_enabled()
    auto.set_enabled(True)
    assert auto.is_enabled()
    assert "Exec='/opt/Hive Mind/hivemind-worker' gui --hidden" in auto.path.read_text()
    auto.set_enabled(False)
    auto.set_enabled(False)  # twice is fine
    assert not auto.is_enabled()


class FakeWinreg:
    """Just enough of winreg for the Run key; the real one exists only on Windows."""

    HKEY_CURRENT_USER = "HKCU"
    KEY_READ = 1
    KEY_SET_VALUE = 2
    REG_SZ = 1

    def __init__(self) -> None:
        self.values: dict[tuple[str, str], dict[str, object]] = {}

    class _Key:
        def __init__(self, store: dict[str, object]) -> None:
            self.store = store

        def __enter__(self) -> FakeWinreg._Key:
            return self

        def __exit__(self, *exc: object) -> None:
            return None

    def OpenKey(self, root: str, path: str, reserved: int, access: int) -> _Key:
        if (root, path) not in self.values:
            raise FileNotFoundError(path)
        return self._Key(self.values[root, path])

    def CreateKeyEx(self, root: str, path: str, reserved: int, access: int) -> _Key:
        return self._Key(self.values.setdefault((root, path), {}))

    def QueryValueEx(self, key: _Key, name: str) -> tuple[object, int]:
        if name not in key.store:
            raise FileNotFoundError(name)
        return key.store[name], self.REG_SZ

    def SetValueEx(self, key: _Key, name: str, reserved: int, kind: int, value: str) -> None:
        key.store[name] = value

    def DeleteValue(self, key: _Key, name: str) -> None:
        if name not in key.store:
            raise FileNotFoundError(name)
        del key.store[name]


def test_windows_run_key_logic_with_a_fake_winreg_not_run_on_windows_here() -> None:
    fake = FakeWinreg()
    run = WindowsRunKey(
        types.SimpleNamespace(**{n: getattr(fake, n) for n in dir(fake) if not n.startswith("__")}),
        [r"C:\Program Files\HiveMind\hivemind-worker.exe", "gui", "--hidden"],
    )
    assert not run.is_enabled()
    run.set_enabled(True)
    assert run.is_enabled()
    assert fake.values["HKCU", RUN_KEY][RUN_VALUE] == (
        r'"C:\Program Files\HiveMind\hivemind-worker.exe" gui --hidden'
    )
    run.set_enabled(False)
    run.set_enabled(False)
    assert not run.is_enabled()


def _left():
    from PySide6.QtCore import Qt

    return Qt.MouseButton.LeftButton


@pytest.fixture(autouse=True)
def _no_real_autostart(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "xdg"))


def test_the_demo_never_saves_its_throwaway_pool_as_yours(qtbot, tmp_path: Path, memory_keyring):
    from helpers.guikit import make_world

    world = make_world(tmp_path / "home")
    pool = LoopPool(world, tmp_path / "pool.db", [])
    app = WorkerApp(world.settings, world.paths, world.credentials, world.engine,
                    autostart_engine=False, before=pool.before, after=pool.after,
                    show_tray=False, exit_on_quit=False, demo=True)  # fmt: skip
    pool.app = app
    app.start_engine()
    try:
        qtbot.waitUntil(lambda: app.settings.node_pool_address != "127.0.0.1:1", timeout=20_000)
        dialog = open_dialog(app)
        dialog.concurrent.setText("2")
        assert dialog.apply()
        saved = load_settings(app.paths, env={})
        assert saved.max_concurrent_tasks == 2
        assert saved.node_pool_address == "127.0.0.1:1"  # the person's, not the demo's
        qtbot.waitUntil(lambda: app.engine.settings.max_concurrent_tasks == 2, timeout=5_000)
        assert app.engine.settings.node_pool_address == app.settings.node_pool_address
    finally:
        app.engine_thread.submit(pool.after()).result(30)
        world.engine.shutdown()
        app.engine_thread.wait(30_000)
        app.model.flush()
        app.dispose()
        qtbot.wait(50)


def test_numbers_are_never_changed_behind_your_back(qtbot, gui_app) -> None:
    """Bug 5: 9999 GiB became 9.0, 999 tasks became 9, -2 became 2, 0 and 9999 CPUs vanished."""
    app, _ = gui_app
    dialog = open_dialog(app)
    ok = dialog.buttons.button(dialog.buttons.StandardButton.Ok)
    for field, key, typed in (
        (dialog.memory, "max_memory_gb", "9999"),
        (dialog.concurrent, "max_concurrent_tasks", "999"),
        (dialog.concurrent, "max_concurrent_tasks", "-2"),
        (dialog.concurrent, "max_concurrent_tasks", "2.5"),
        (dialog.cpu_spin, "max_cpu_cores", "9999"),
        (dialog.cpu_spin, "max_cpu_cores", "two"),
        (dialog.disk, "max_disk_gb", "0"),
    ):
        before = field.text()
        field.clear()
        qtbot.keyClicks(field, typed)
        assert field.text() == typed  # kept exactly as typed
        label = dialog._error_labels[key]
        assert label.isVisibleTo(dialog) and label.text().startswith("expected"), (key, typed)
        assert not ok.isEnabled()
        assert field.accessibleDescription()
        assert not dialog.apply()
        field.setText(before)
        assert ok.isEnabled(), (key, before, dialog.errors)
    assert not app.paths.settings_file.exists()


def test_a_cpu_cap_no_task_fits_in_is_flagged_in_the_dialog_and_the_header(qtbot, gui_app) -> None:
    """Bug 4: with 0.5 CPU the app said 'waiting for work' forever."""
    app, _ = gui_app
    dialog = open_dialog(app)
    dialog.cpu_spin.setText("0.5")
    assert dialog.cap_warning.isVisibleTo(dialog)
    assert "at least 1 CPU" in dialog.cap_warning.text()
    assert dialog.apply()  # allowed, but said
    app.start()
    qtbot.waitUntil(lambda: app.model.state.value == "idle", timeout=20_000)
    assert "No task can run" in app.dashboard.state_detail.text()
    assert "1 CPU" in app.dashboard.state_detail.text()
    assert app.status().attention  # the tray shows "needs attention"
    dialog.cpu_spin.setText("1")
    assert not dialog.cap_warning.isVisibleTo(dialog)
    assert dialog.apply()
    assert "No task can run" not in app.dashboard.state_detail.text()


def test_a_bad_account_name_is_refused_beside_the_field(qtbot, gui_app) -> None:
    """Bug 6: 'bob smith/../;' was accepted and put the engine into error."""
    app, _ = gui_app
    dialog = open_dialog(app)
    dialog.account.clear()
    qtbot.keyClicks(dialog.account, "bob smith/../;")
    assert "letters, digits" in dialog._error_labels["account"].text()
    assert not dialog.apply()
    assert app.engine.settings.account != "bob smith/../;"


def test_enter_in_the_password_field_signs_in_and_keeps_the_dialog_open(
    qtbot, gui_app, memory_keyring
) -> None:
    """Bug 1: Enter closed Settings (saving it) without signing in."""
    app, pool = gui_app
    assert pool.world.pool is not None
    dialog = open_dialog(app)
    dialog.address.setText(pool.world.pool.address)
    dialog.account.setText(USER)
    dialog.password.setFocus()
    qtbot.keyClicks(dialog.password, PASSWORD)
    with qtbot.waitSignal(dialog.loginChanged, timeout=15_000) as changed:
        qtbot.keyClick(dialog.password, Qt.Key.Key_Return)
    assert changed.args == [USER]
    assert dialog.isVisible()  # not closed by the default button
    assert not app.paths.settings_file.exists()  # and nothing saved behind the person's back


def test_login_status_follows_the_address_as_typed(qtbot, gui_app, memory_keyring) -> None:
    """Bug 9: the login status went stale after the address changed."""
    app, pool = gui_app
    assert pool.world.pool is not None
    dialog = open_dialog(app)
    dialog.address.setText(pool.world.pool.address)
    dialog.account.setText(USER)
    qtbot.waitUntil(lambda: dialog.logged_in_as == USER, timeout=10_000)
    dialog.address.setText("127.0.0.1:9")  # no login stored for this one
    qtbot.waitUntil(lambda: dialog.logged_in_as == "", timeout=10_000)
    assert "Not logged in" in dialog.login_state.text()


def test_the_docker_switch_is_in_the_dialog_with_what_it_means(qtbot, gui_app) -> None:
    app, _ = gui_app
    dialog = open_dialog(app)
    assert dialog.docker_enabled.isChecked() == app.settings.docker_enabled
    assert "process sandbox" in dialog.docker_status.text()  # this world's engine
    dialog.docker_enabled.setChecked(False)
    assert dialog.apply()
    assert load_settings(app.paths, env={}).docker_enabled is False


def test_autostart_keeps_the_data_folder(tmp_path: Path) -> None:
    """Bug 11: the XDG entry dropped HIVEMIND_HOME / --data-dir."""
    from hivemind_worker.gui.autostart import launch_command
    from hivemind_worker.paths import default_paths

    command = launch_command(default_paths(tmp_path / "my home"))
    assert command[-4:] == ["--data-dir", str(tmp_path / "my home"), "gui", "--hidden"]
    auto = XdgAutostart(tmp_path / "xdg", command)
    auto.set_enabled(True)
    assert f"--data-dir '{tmp_path / 'my home'}' gui --hidden" in auto.path.read_text()
