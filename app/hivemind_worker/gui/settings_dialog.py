"""The settings dialog: pool, account, resource caps and desktop behaviour, checked as typed."""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
from collections.abc import Callable
from typing import Any

import psutil
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QAbstractButton,
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QDoubleSpinBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSlider,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from hivemind_worker.config import GIB, ConfigError, Settings, check_setting, save_settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.gui.engine_thread import Call, EngineThread
from hivemind_worker.paths import Paths
from hivemind_worker.wiring import login_to_pool

ERROR_STYLE = "color: #d64541;"  # mid red: readable on light and dark backgrounds
OK_STYLE = "color: #3fa66b;"


def free_disk_gb(settings: Settings) -> float:
    path = settings.work_dir
    while not path.exists() and path != path.parent:
        path = path.parent
    return psutil.disk_usage(str(path)).free / GIB


async def test_connection(address: str, insecure: bool) -> str:
    """Ping the pool; a one-line answer for the dialog, or PoolError."""
    from hivemind_worker.engine.pool_client import NodePoolClient

    client = NodePoolClient(address, insecure=insecure, timeout=10)
    try:
        version = await client.ping()
    finally:
        await client.close()
    return f"Reached the pool (version {version or 'unknown'})"


async def log_in(
    settings: Settings, credentials: CredentialStore, account: str, password: str
) -> str:
    await login_to_pool(settings, credentials, account, password)
    return account


async def log_out(credentials: CredentialStore, address: str, account: str) -> None:
    await asyncio.to_thread(credentials.delete_token, address, account)


async def login_status(credentials: CredentialStore, address: str, account: str) -> str:
    """The account with a token for `address`, or '' (keyring calls, so off the GUI thread)."""
    last: str | None = await asyncio.to_thread(credentials.last_account, address)
    name = account or last or ""
    if not name:
        return ""
    token = await asyncio.to_thread(credentials.get_token, address, name)
    return name if token else ""


class SettingsDialog(QDialog):
    """Edits a copy of the settings; Apply/OK validate, save to the TOML file and apply."""

    applied = Signal(object)  # the new Settings
    loginChanged = Signal(str)  # the account now logged in, or ''

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        credentials: CredentialStore,
        engine_thread: EngineThread,
        *,
        set_autostart: Callable[[bool], None],
        persist: Callable[[Settings], None] | None = None,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("HiveMind Worker settings")
        self.settings = settings
        self.paths = paths
        self.credentials = credentials
        self.engine_thread = engine_thread
        self._set_autostart = set_autostart
        self._persist = persist or (lambda settings: save_settings(paths, settings))
        self._calls: set[Call] = set()
        self.errors: dict[str, str] = {}
        self._error_labels: dict[str, QLabel] = {}
        self.logged_in_as = ""
        self._login_generation = 0
        self._build()
        self.load(settings)
        self.refresh_login()

    # ------------------------------------------------------------------ layout

    def _error_label(self, key: str) -> QLabel:
        label = QLabel()
        label.setStyleSheet(ERROR_STYLE)
        label.setWordWrap(True)
        label.hide()
        self._error_labels[key] = label
        return label

    def _build(self) -> None:
        layout = QVBoxLayout(self)

        pool = QGroupBox("Pool")
        form = QFormLayout(pool)
        self.address = QLineEdit()
        self.address.setPlaceholderText("host:port")
        self.address.textChanged.connect(self.validate)
        self.test_button = QPushButton("&Test connection")
        self.test_button.clicked.connect(self.test_connection)
        row = QHBoxLayout()
        row.addWidget(self.address, 1)
        row.addWidget(self.test_button)
        address_label = QLabel("Pool &address:")
        address_label.setBuddy(self.address)
        form.addRow(address_label, row)
        form.addRow("", self._error_label("node_pool_address"))
        self.test_result = QLabel()
        self.test_result.setWordWrap(True)
        form.addRow("", self.test_result)
        layout.addWidget(pool)

        account = QGroupBox("Account")
        form = QFormLayout(account)
        self.login_state = QLabel("Checking…")
        form.addRow("Status:", self.login_state)
        self.account = QLineEdit()
        self.account.textChanged.connect(self.validate)
        self.password = QLineEdit()
        self.password.setEchoMode(QLineEdit.EchoMode.Password)
        self.login_button = QPushButton("&Log in")
        self.login_button.clicked.connect(self.log_in)
        self.logout_button = QPushButton("Log &out")
        self.logout_button.clicked.connect(self.log_out)
        account_label = QLabel("Acc&ount name:")
        account_label.setBuddy(self.account)
        form.addRow(account_label, self.account)
        form.addRow("", self._error_label("account"))
        password_label = QLabel("&Password:")
        password_label.setBuddy(self.password)
        buttons = QHBoxLayout()
        buttons.addWidget(self.password, 1)
        buttons.addWidget(self.login_button)
        buttons.addWidget(self.logout_button)
        form.addRow(password_label, buttons)
        self.login_result = QLabel()
        self.login_result.setWordWrap(True)
        form.addRow("", self.login_result)
        layout.addWidget(account)

        limits = QGroupBox("What this computer gives")
        form = QFormLayout(limits)
        cores = os.cpu_count() or 1
        self.cpu_slider = QSlider(Qt.Orientation.Horizontal)
        self.cpu_slider.setRange(1, cores * 10)  # tenths of a core
        self.cpu_slider.setPageStep(10)
        self.cpu_spin = QDoubleSpinBox()
        self.cpu_spin.setRange(0.1, float(cores))
        self.cpu_spin.setDecimals(1)
        self.cpu_spin.setSingleStep(0.5)
        self.cpu_spin.setSuffix(f" of {cores} cores")
        self.cpu_slider.valueChanged.connect(lambda v: self.cpu_spin.setValue(v / 10))
        self.cpu_spin.valueChanged.connect(lambda v: self.cpu_slider.setValue(round(v * 10)))
        self.cpu_spin.valueChanged.connect(self.validate)
        form.addRow(
            self._labelled("&CPU:", self.cpu_slider), self._pair(self.cpu_slider, self.cpu_spin)
        )
        form.addRow("", self._error_label("max_cpu_cores"))

        total_gb = psutil.virtual_memory().total / GIB
        self.memory = QDoubleSpinBox()
        self.memory.setRange(0.1, math.floor(total_gb * 10) / 10)
        self.memory.setDecimals(1)
        self.memory.setSuffix(f" GiB of {total_gb:.1f} GiB")  # the settings count in GiB
        self.memory.valueChanged.connect(self.validate)
        form.addRow(self._labelled("&Memory:", self.memory), self.memory)
        form.addRow("", self._error_label("max_memory_gb"))

        self.disk = QDoubleSpinBox()
        self.disk.setDecimals(1)
        self.disk.setRange(0.1, 100_000)
        self.disk.valueChanged.connect(self.validate)
        form.addRow(self._labelled("&Disk:", self.disk), self.disk)
        form.addRow("", self._error_label("max_disk_gb"))

        self.concurrent = QSpinBox()
        self.concurrent.setRange(1, 64)
        self.concurrent.valueChanged.connect(self.validate)
        form.addRow(self._labelled("Tasks at &once:", self.concurrent), self.concurrent)
        layout.addWidget(limits)

        desktop = QGroupBox("Desktop")
        box = QVBoxLayout(desktop)
        self.start_at_login = QCheckBox("Start HiveMind Worker when I log &in")
        self.start_on_launch = QCheckBox("Start &contributing when the app starts")
        self.close_to_tray = QCheckBox("Closing the window keeps it running in the t&ray")
        for check in (self.start_at_login, self.start_on_launch, self.close_to_tray):
            box.addWidget(check)
        layout.addWidget(desktop)

        self.save_error = QLabel()
        self.save_error.setStyleSheet(ERROR_STYLE)
        self.save_error.setWordWrap(True)
        self.save_error.hide()
        layout.addWidget(self.save_error)

        self.buttons = QDialogButtonBox(
            QDialogButtonBox.StandardButton.Ok
            | QDialogButtonBox.StandardButton.Apply
            | QDialogButtonBox.StandardButton.Cancel
        )
        self.buttons.clicked.connect(self._on_button)
        layout.addWidget(self.buttons)

    @staticmethod
    def _labelled(text: str, buddy: QWidget) -> QLabel:
        label = QLabel(text)
        label.setBuddy(buddy)
        return label

    @staticmethod
    def _pair(a: QWidget, b: QWidget) -> QHBoxLayout:
        row = QHBoxLayout()
        row.addWidget(a, 1)
        row.addWidget(b)
        return row

    # ------------------------------------------------------------------ values

    def load(self, settings: Settings) -> None:
        self.settings = settings
        self.address.setText(settings.node_pool_address)
        self.account.setText(settings.account)
        self.cpu_spin.setValue(settings.cpu_cap())
        self.memory.setValue(settings.memory_cap_bytes() / GIB)
        free = free_disk_gb(settings)
        self.disk.setMaximum(max(0.1, math.floor(free * 10) / 10))
        self.disk.setSuffix(f" GiB ({free:.1f} GiB free)")
        self.disk.setValue(settings.max_disk_gb)
        self.concurrent.setValue(settings.max_concurrent_tasks)
        self.start_at_login.setChecked(settings.start_at_login)
        self.start_on_launch.setChecked(settings.start_on_launch)
        self.close_to_tray.setChecked(settings.close_to_tray)
        self.validate()

    def raw_values(self) -> dict[str, Any]:
        return {
            "node_pool_address": self.address.text().strip(),
            "account": self.account.text().strip(),
            "max_cpu_cores": round(self.cpu_spin.value(), 1),
            "max_memory_gb": round(self.memory.value(), 1),
            "max_disk_gb": round(self.disk.value(), 1),
            "max_concurrent_tasks": self.concurrent.value(),
            "start_at_login": self.start_at_login.isChecked(),
            "start_on_launch": self.start_on_launch.isChecked(),
            "close_to_tray": self.close_to_tray.isChecked(),
        }

    def validate(self) -> bool:
        """Check every field with the settings' own rules; show each problem beside its field."""
        self.errors.clear()
        for key, raw in self.raw_values().items():
            try:
                check_setting(self.paths, key, raw)
            except ConfigError as exc:
                message = str(exc)
                self.errors[key] = message[message.find("expected") :] or message
        if not self.errors.get("max_disk_gb") and self.disk.value() > self.disk.maximum():
            self.errors["max_disk_gb"] = "expected no more than the free disk space"
        for key, label in self._error_labels.items():
            text = self.errors.get(key, "")
            label.setText(text)
            label.setVisible(bool(text))
        widgets = {"node_pool_address": self.address, "account": self.account}
        for key, widget in widgets.items():
            # An accessible hint, not only a colour: screen readers announce it.
            widget.setAccessibleDescription(self.errors.get(key, ""))
            widget.setStyleSheet("border: 1px solid #d64541;" if key in self.errors else "")
        ok = not self.errors
        for which in (QDialogButtonBox.StandardButton.Ok, QDialogButtonBox.StandardButton.Apply):
            self.buttons.button(which).setEnabled(ok)
        self.test_button.setEnabled("node_pool_address" not in self.errors)
        return ok

    def new_settings(self) -> Settings:
        values = {k: check_setting(self.paths, k, v) for k, v in self.raw_values().items()}
        return dataclasses.replace(self.settings, **values)

    def apply(self) -> bool:
        """Validate, write the TOML file, update autostart and hand the settings to the engine."""
        self.save_error.hide()
        if not self.validate():
            return False
        try:
            settings = self.new_settings()
            self._persist(settings)
            if settings.start_at_login != self.settings.start_at_login:
                self._set_autostart(settings.start_at_login)
        except (ConfigError, OSError) as exc:
            self.save_error.setText(f"Could not save the settings: {exc}")
            self.save_error.show()
            return False
        self.settings = settings
        self.applied.emit(settings)
        return True

    def _on_button(self, button: QAbstractButton) -> None:
        role = self.buttons.standardButton(button)
        if role == QDialogButtonBox.StandardButton.Apply:
            self.apply()
        elif role == QDialogButtonBox.StandardButton.Ok:
            if self.apply():
                self.accept()
        else:
            self.reject()

    # ------------------------------------------------------------------ off-thread actions

    def _run(
        self,
        coro: Any,
        on_ok: Callable[[Any], None],
        on_fail: Callable[[str], None],
    ) -> Call:
        calls: list[Call] = []
        finished: list[bool] = []

        def finish(handler: Callable[[Any], None], value: Any) -> None:
            finished.append(True)
            for call in calls:
                self._calls.discard(call)
            handler(value)

        call = Call(
            self.engine_thread.submit(coro),
            lambda value: finish(on_ok, value),
            lambda message: finish(on_fail, message),
            self,
        )
        calls.append(call)
        if not finished:  # kept alive until its answer arrives
            self._calls.add(call)
        return call

    def test_connection(self) -> None:
        if not self.validate() and "node_pool_address" in self.errors:
            return
        self.test_button.setEnabled(False)
        self.test_result.setStyleSheet("")
        self.test_result.setText("Connecting…")

        def ok(message: str) -> None:
            self.test_button.setEnabled(True)
            self.test_result.setStyleSheet(OK_STYLE)
            self.test_result.setText(message)

        def fail(message: str) -> None:
            self.test_button.setEnabled(True)
            self.test_result.setStyleSheet(ERROR_STYLE)
            self.test_result.setText(f"Could not reach the pool: {message}")

        self._run(test_connection(self.address.text().strip(), self.settings.insecure), ok, fail)

    def refresh_login(self) -> None:
        address = self.address.text().strip() or self.settings.node_pool_address
        self._login_generation += 1
        generation = self._login_generation

        def show(name: str) -> None:
            if generation != self._login_generation:
                return  # an older check answering late; a newer one is on its way
            self.logged_in_as = name
            self.login_state.setText(
                f"Logged in as {name}" if name else f"Not logged in to {address}"
            )
            self.logout_button.setEnabled(bool(name))
            if name and not self.account.text().strip():
                self.account.setText(name)

        self._run(
            login_status(self.credentials, address, self.account.text().strip()),
            show,
            lambda message: self.login_state.setText(f"Keyring unavailable: {message}"),
        )

    def log_in(self) -> None:
        account = self.account.text().strip()
        password = self.password.text()
        if not account or not password or "node_pool_address" in self.errors:
            self.login_result.setStyleSheet(ERROR_STYLE)
            self.login_result.setText("Enter a valid pool address, account name and password.")
            return
        target = dataclasses.replace(
            self.settings, node_pool_address=self.address.text().strip(), account=account
        )
        self.login_button.setEnabled(False)
        self.login_result.setStyleSheet("")
        self.login_result.setText("Logging in…")

        def ok(name: str) -> None:
            self.password.clear()
            self.login_button.setEnabled(True)
            self.login_result.setStyleSheet(OK_STYLE)
            self.login_result.setText(
                f"Logged in; the token is kept in {self.credentials.backend_name}."
            )
            self.refresh_login()
            self.loginChanged.emit(name)

        def fail(message: str) -> None:
            self.login_button.setEnabled(True)
            self.login_result.setStyleSheet(ERROR_STYLE)
            self.login_result.setText(f"Login failed: {message}")

        self._run(log_in(target, self.credentials, account, password), ok, fail)

    def log_out(self) -> None:
        address = self.address.text().strip()
        account = self.logged_in_as or self.account.text().strip()

        def ok(_: object) -> None:
            self.login_result.setStyleSheet("")
            self.login_result.setText(f"Logged out of {address}.")
            self.refresh_login()
            self.loginChanged.emit("")

        def fail(message: str) -> None:
            self.login_result.setStyleSheet(ERROR_STYLE)
            self.login_result.setText(f"Log out failed: {message}")

        self._run(log_out(self.credentials, address, account), ok, fail)
