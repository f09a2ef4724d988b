"""The settings dialog: pool, account, resource caps, desktop behaviour, when to contribute and
the kinds of tasks taken, checked as typed."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import psutil
from PySide6.QtCore import Qt, QTimer, Signal
from PySide6.QtWidgets import (
    QAbstractButton,
    QCheckBox,
    QDialog,
    QDialogButtonBox,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QSlider,
    QTabWidget,
    QVBoxLayout,
    QWidget,
)

from hivemind_worker.config import GIB, ConfigError, Settings, check_setting, save_settings
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.gui.engine_thread import Call, Calls, EngineThread
from hivemind_worker.gui.forms import (
    ERROR_STYLE,
    OK_STYLE,
    WARN_STYLE,
    EnterRuns,
    account_problem,
    free_disk_gb,
    log_in,
    log_out,
    login_status,
    test_connection,
)
from hivemind_worker.gui.policy_page import PolicyPage
from hivemind_worker.gui.tasks_page import TasksPage
from hivemind_worker.gui.words import DOCKER_INSTALL_URL, cap_problems
from hivemind_worker.paths import Paths

NUMBER_KEYS = ("max_cpu_cores", "max_memory_gb", "max_disk_gb", "max_concurrent_tasks")


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
        self._calls = Calls(engine_thread, self)
        self.errors: dict[str, str] = {}
        self._error_labels: dict[str, QLabel] = {}
        self.logged_in_as = ""
        self._login_generation = 0
        self._syncing = False  # slider and CPU field updating each other
        self._units: dict[QLineEdit, QLabel] = {}
        self.free_disk = float("inf")  # known once load() has looked
        # Login status follows the address and account as typed, checked once typing pauses.
        self._login_timer = QTimer(self)
        self._login_timer.setSingleShot(True)
        self._login_timer.setInterval(400)
        self._login_timer.timeout.connect(self.refresh_login)
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
        outer = QVBoxLayout(self)
        general = QWidget()
        layout = QVBoxLayout(general)
        layout.setContentsMargins(0, 0, 0, 0)

        pool = QGroupBox("Pool")
        form = QFormLayout(pool)
        self.address = QLineEdit()
        self.address.setPlaceholderText("host:port")
        self.address.textChanged.connect(self.validate)
        self.address.textChanged.connect(self._login_timer.start)
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
        self.account.textChanged.connect(self._login_timer.start)
        self.password = QLineEdit()
        self.password.setEchoMode(QLineEdit.EchoMode.Password)
        self._enter = EnterRuns(self.password, self.log_in)
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
        total_gb = psutil.virtual_memory().total / GIB
        self.cpu_slider = QSlider(Qt.Orientation.Horizontal)
        self.cpu_slider.setRange(0, cores * 10)  # tenths of a core
        self.cpu_slider.setPageStep(10)
        self.cpu_slider.setAccessibleName("CPU cores")
        # Text fields, not spin boxes: a spin box silently clamps or rewrites what was typed
        # (9999 became 9.0); here every value is checked as typed and shown beside the field.
        self.cpu_spin = self._number_field(f"cores of {cores} (0 = all)")
        self.cpu_slider.valueChanged.connect(self._slider_moved)
        self.cpu_spin.textChanged.connect(self._cpu_typed)
        form.addRow(
            self._labelled("&CPU:", self.cpu_spin), self._pair(self.cpu_slider, self.cpu_spin)
        )
        form.addRow("", self._error_label("max_cpu_cores"))
        self.memory = self._number_field(f"GiB of {total_gb:.1f} (0 = half)")
        form.addRow(self._labelled("&Memory:", self.memory), self._unit(self.memory))
        form.addRow("", self._error_label("max_memory_gb"))
        self.disk = self._number_field("GiB")
        form.addRow(self._labelled("&Disk:", self.disk), self._unit(self.disk))
        form.addRow("", self._error_label("max_disk_gb"))
        self.concurrent = self._number_field("at most 64")
        form.addRow(self._labelled("Tasks at &once:", self.concurrent), self._unit(self.concurrent))
        form.addRow("", self._error_label("max_concurrent_tasks"))
        self.cap_warning = QLabel()
        self.cap_warning.setStyleSheet(WARN_STYLE)
        self.cap_warning.setWordWrap(True)
        self.cap_warning.hide()
        form.addRow("", self.cap_warning)
        layout.addWidget(limits)

        sandbox = QGroupBox("How tasks are isolated")
        box = QVBoxLayout(sandbox)
        self.docker_enabled = QCheckBox("Run tasks in &Docker containers when Docker is available")
        self.docker_status = QLabel()
        self.docker_status.setWordWrap(True)
        self.docker_status.setOpenExternalLinks(True)
        box.addWidget(self.docker_enabled)
        box.addWidget(self.docker_status)
        layout.addWidget(sandbox)

        desktop = QGroupBox("Desktop")
        box = QVBoxLayout(desktop)
        self.start_at_login = QCheckBox("Start HiveMind Worker when I log &in")
        self.start_on_launch = QCheckBox("Start &contributing when the app starts")
        self.close_to_tray = QCheckBox("Closing the window keeps it running in the t&ray")
        for check in (self.start_at_login, self.start_on_launch, self.close_to_tray):
            box.addWidget(check)
        layout.addWidget(desktop)

        self.policy = PolicyPage(self.paths)
        self.policy.changed.connect(self.validate)
        self.tabs = QTabWidget()
        self.tabs.addTab(general, "&General")
        self.tabs.addTab(self.policy, "&When to contribute")
        self.tasks = TasksPage()
        self.tabs.addTab(self.tasks, "&Kinds of tasks")
        outer.addWidget(self.tabs)
        layout = outer
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

    def _number_field(self, unit: str) -> QLineEdit:
        field = QLineEdit()
        field.setMaximumWidth(90)
        field.setProperty("unit", unit)
        field.textChanged.connect(self.validate)
        return field

    def _unit(self, field: QLineEdit) -> QHBoxLayout:
        row = QHBoxLayout()
        row.addWidget(field)
        unit = QLabel(str(field.property("unit")))
        self._units[field] = unit
        row.addWidget(unit, 1)
        return row

    def _slider_moved(self, tenths: int) -> None:
        if not self._syncing:
            self._syncing = True
            self.cpu_spin.setText(f"{tenths / 10:g}")
            self._syncing = False

    def _cpu_typed(self, text: str) -> None:
        if self._syncing:
            return
        try:
            value = float(text)
        except ValueError:
            return
        self._syncing = True  # the slider follows; the text stays exactly as typed
        self.cpu_slider.setValue(round(value * 10))
        self._syncing = False

    def _pair(self, a: QWidget, b: QLineEdit) -> QHBoxLayout:
        row = QHBoxLayout()
        row.addWidget(a, 1)
        row.addWidget(b)
        row.addWidget(QLabel(str(b.property("unit"))))
        return row

    # ------------------------------------------------------------------ values

    def load(self, settings: Settings) -> None:
        self.settings = settings
        self.address.setText(settings.node_pool_address)
        self.account.setText(settings.account)
        self.cpu_spin.setText(f"{settings.max_cpu_cores:g}")
        self.memory.setText(f"{settings.max_memory_gb:g}")
        free = free_disk_gb(settings)
        self.free_disk = free
        self._units[self.disk].setText(f"GiB ({free:.1f} GiB free)")
        self.disk.setText(f"{settings.max_disk_gb:g}")
        self.concurrent.setText(str(settings.max_concurrent_tasks))
        self.docker_enabled.setChecked(settings.docker_enabled)
        self.policy.load(settings)
        self.tasks.load(settings)
        self.start_at_login.setChecked(settings.start_at_login)
        self.start_on_launch.setChecked(settings.start_on_launch)
        self.close_to_tray.setChecked(settings.close_to_tray)
        self.validate()

    def raw_values(self) -> dict[str, Any]:
        return (
            self.policy.raw_values()
            | self.tasks.raw_values()
            | {
                "node_pool_address": self.address.text().strip(),
                "account": self.account.text().strip(),
                # Exactly what was typed: check_setting parses text as the environment's is.
                "max_cpu_cores": self.cpu_spin.text().strip(),
                "max_memory_gb": self.memory.text().strip(),
                "max_disk_gb": self.disk.text().strip(),
                "max_concurrent_tasks": self.concurrent.text().strip(),
                "docker_enabled": self.docker_enabled.isChecked(),
                "start_at_login": self.start_at_login.isChecked(),
                "start_on_launch": self.start_on_launch.isChecked(),
                "close_to_tray": self.close_to_tray.isChecked(),
            }
        )

    def validate(self) -> bool:
        """Check every field with the settings' own rules; show each problem beside its field."""
        self.errors.clear()
        for key, raw in self.raw_values().items():
            try:
                check_setting(self.paths, key, raw)
            except ConfigError as exc:
                # "Invalid setting key = 'x' (as entered): expected …": the part after the
                # colon is what the person needs beside the field.
                message = str(exc)
                at = message.find("): ")
                self.errors[key] = message[at + 3 :] if at >= 0 else message
        if not self.errors.get("max_disk_gb") and float(self.disk.text()) > self.free_disk:
            self.errors["max_disk_gb"] = (
                f"expected no more than the free disk space ({self.free_disk:.1f} GiB)"
            )
        problem = account_problem(self.account.text().strip())
        if problem and "account" not in self.errors:
            self.errors["account"] = problem
        self.policy.validate()  # its own labels, beside its fields
        for key, label in self._error_labels.items():
            text = self.errors.get(key, "")
            label.setText(text)
            label.setVisible(bool(text))
        widgets = {
            "node_pool_address": self.address,
            "account": self.account,
            "max_cpu_cores": self.cpu_spin,
            "max_memory_gb": self.memory,
            "max_disk_gb": self.disk,
            "max_concurrent_tasks": self.concurrent,
        }
        for key, widget in widgets.items():
            # An accessible hint, not only a colour: screen readers announce it.
            widget.setAccessibleDescription(self.errors.get(key, ""))
            widget.setStyleSheet("border: 1px solid #d64541;" if key in self.errors else "")
        ok = not self.errors
        for which in (QDialogButtonBox.StandardButton.Ok, QDialogButtonBox.StandardButton.Apply):
            self.buttons.button(which).setEnabled(ok)
        self.test_button.setEnabled("node_pool_address" not in self.errors)
        self._show_cap_warning()
        return ok

    def _show_cap_warning(self) -> None:
        """Caps no task fits in are allowed (the person may mean it) but never silent."""
        # Each cap on its own: a bad memory value must not hide a CPU cap no task fits in.
        probe = self.settings
        if "max_cpu_cores" not in self.errors:
            probe = dataclasses.replace(probe, max_cpu_cores=float(self.cpu_spin.text()))
        if "max_memory_gb" not in self.errors:
            probe = dataclasses.replace(probe, max_memory_gb=float(self.memory.text()))
        problems = cap_problems(probe)
        text = f"No task can run: {' and '.join(problems)}." if problems else ""
        self.cap_warning.setText(text)
        self.cap_warning.setVisible(bool(text))
        self._fit()

    def _fit(self) -> None:
        """Grow to show a new message whole (an error, a login answer): never clip it."""
        if self.isVisible():
            hint = self.sizeHint()
            self.resize(max(self.width(), hint.width()), max(self.height(), hint.height()))

    def show_docker_status(self, capability: str, notice: str) -> None:
        """What the running engine uses (the executor is chosen when the app starts)."""
        if capability == "docker":
            text = "Docker is running: tasks run in containers, the safest way."
        elif not capability:
            text = "Looking for Docker on this computer…"
        else:
            why = (
                "Docker is switched off here"
                if not self.settings.docker_enabled
                else ("Docker was not found or is not running")
            )
            text = (
                f"{why}, so tasks run in the built-in process sandbox and container tasks "
                f'are skipped. <a href="{DOCKER_INSTALL_URL}">How to install Docker</a>. '
                "A change here takes effect when the app next starts."
            )
        self.docker_status.setText(text)
        self.docker_status.setToolTip(notice)

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

    def _run(self, coro: Any, on_ok: Callable[[Any], None], on_fail: Callable[[str], None]) -> Call:
        return self._calls.run(coro, on_ok, on_fail)

    def test_connection(self) -> None:
        if not self.validate() and "node_pool_address" in self.errors:
            return
        self.test_button.setEnabled(False)
        self.test_result.setStyleSheet("")
        self.test_result.setText("Connecting…")
        self._fit()

        def ok(message: str) -> None:
            self.test_button.setEnabled(True)
            self.test_result.setStyleSheet(OK_STYLE)
            self.test_result.setText(message)
            self._fit()

        def fail(message: str) -> None:
            self.test_button.setEnabled(True)
            self.test_result.setStyleSheet(ERROR_STYLE)
            self.test_result.setText(f"Could not reach the pool: {message}")
            self._fit()

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
            self._fit()
            return
        target = dataclasses.replace(
            self.settings, node_pool_address=self.address.text().strip(), account=account
        )
        self.login_button.setEnabled(False)
        self.login_result.setStyleSheet("")
        self.login_result.setText("Logging in…")
        self._fit()

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
            self._fit()

        self._run(log_in(target, self.credentials, account, password), ok, fail)

    def log_out(self) -> None:
        address = self.address.text().strip()
        account = self.logged_in_as or self.account.text().strip()

        def ok(_: object) -> None:
            self.login_result.setStyleSheet("")
            self.login_result.setText(f"Logged out of {address}.")
            self._fit()
            self.refresh_login()
            self.loginChanged.emit("")

        def fail(message: str) -> None:
            self.login_result.setStyleSheet(ERROR_STYLE)
            self.login_result.setText(f"Log out failed: {message}")
            self._fit()

        self._run(log_out(self.credentials, address, account), ok, fail)
