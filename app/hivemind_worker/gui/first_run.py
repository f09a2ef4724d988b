"""The first-run flow: what HiveMind is, the pool and sign-in, what to give, when, Docker, done.

Every step works with the keyboard alone and none needs a terminal. Re-runnable from the menu.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import psutil
from PySide6.QtCore import Qt, Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
    QWizard,
    QWizardPage,
)

from hivemind_worker.config import GIB, ConfigError, Settings, check_setting
from hivemind_worker.credentials import CredentialStore
from hivemind_worker.gui.engine_thread import Calls, EngineThread
from hivemind_worker.gui.forms import (
    ERROR_STYLE,
    OK_STYLE,
    WARN_STYLE,
    EnterRuns,
    account_problem,
    free_disk_gb,
    log_in,
    test_connection,
)
from hivemind_worker.gui.policy_page import ALWAYS, AWAY, PRESETS
from hivemind_worker.gui.words import DOCKER_INSTALL_URL, cap_problems
from hivemind_worker.paths import Paths


def _wrapped(text: str) -> QLabel:
    label = QLabel(text)
    label.setWordWrap(True)
    label.setTextFormat(Qt.TextFormat.RichText)
    label.setOpenExternalLinks(True)
    return label


def _field_error(exc: ConfigError) -> str:
    message = str(exc)
    at = message.find("): ")
    return message[at + 3 :] if at >= 0 else message


class WelcomePage(QWizardPage):
    def __init__(self) -> None:
        super().__init__()
        self.setTitle("Welcome to HiveMind Worker")
        layout = QVBoxLayout(self)
        layout.addWidget(
            _wrapped(
                "<p>HiveMind lends this computer's spare time to people who need computing "
                "power: scientists, students, small projects. They send small tasks to a "
                "<b>pool</b>; this app fetches tasks from it, runs them and sends the results "
                "back.</p>"
                "<p>On this computer the app will:</p><ul>"
                "<li>run each task shut away from your files, with no network unless the task "
                "needs it;</li>"
                "<li>use only the processor, memory and disk you allow;</li>"
                "<li>pause or stop whenever you say, from the window or the icon near the "
                "clock.</li></ul>"
                "<p>Setting up takes about a minute.</p>"
            )
        )


class PoolPage(QWizardPage):
    """The pool's address (with Test connection) and signing in; complete once signed in."""

    def __init__(self, wizard: FirstRunWizard) -> None:
        super().__init__()
        self.w = wizard
        self.signed_in = ""
        self.setTitle("Your pool and account")
        self.setSubTitle("The pool hands out the tasks. Sign in with the account you were given.")
        form = QFormLayout(self)
        self.address = QLineEdit(wizard.settings.node_pool_address)
        self.address.setAccessibleName("Pool address")
        self.address.textChanged.connect(self._edited)
        self.test_button = QPushButton("&Test connection")
        self.test_button.setAutoDefault(False)
        self.test_button.clicked.connect(self.test)
        row = QHBoxLayout()
        row.addWidget(self.address, 1)
        row.addWidget(self.test_button)
        label = QLabel("Pool &address:")
        label.setBuddy(self.address)
        form.addRow(label, row)
        self.address_error = _wrapped("")
        self.address_error.setStyleSheet(ERROR_STYLE)
        form.addRow("", self.address_error)
        self.test_result = _wrapped("")
        form.addRow("", self.test_result)
        self.account = QLineEdit(wizard.settings.account)
        self.account.setAccessibleName("Account name")
        self.account.textChanged.connect(self._edited)
        label = QLabel("Acc&ount name:")
        label.setBuddy(self.account)
        form.addRow(label, self.account)
        self.account_error = _wrapped("")
        self.account_error.setStyleSheet(ERROR_STYLE)
        form.addRow("", self.account_error)
        self.password = QLineEdit()
        self.password.setEchoMode(QLineEdit.EchoMode.Password)
        self.password.setAccessibleName("Password")
        self._enter = EnterRuns(self.password, self.sign_in)
        self.sign_in_button = QPushButton("&Sign in")
        self.sign_in_button.setAutoDefault(False)
        self.sign_in_button.clicked.connect(self.sign_in)
        row = QHBoxLayout()
        row.addWidget(self.password, 1)
        row.addWidget(self.sign_in_button)
        label = QLabel("&Password:")
        label.setBuddy(self.password)
        form.addRow(label, row)
        self.result = _wrapped("")
        form.addRow("", self.result)
        form.addRow(
            "",
            _wrapped(
                "No account yet? Ask whoever runs this pool for one; the pool does not "
                "create accounts from here."
            ),
        )
        self._edited()

    def initializePage(self) -> None:
        self.address.setFocus()
        self.address.selectAll()

    def _problems(self) -> tuple[str, str]:
        try:
            check_setting(self.w.paths, "node_pool_address", self.address.text().strip())
            address = ""
        except ConfigError as exc:
            address = _field_error(exc)
        return address, account_problem(self.account.text().strip())

    def _edited(self) -> None:
        address, account = self._problems()
        self.address_error.setText(address)
        self.address_error.setVisible(bool(address))
        self.account_error.setText(account)
        self.account_error.setVisible(bool(account))
        self.test_button.setEnabled(not address)
        self.signed_in = ""  # another pool or account: sign in again
        self.completeChanged.emit()

    def isComplete(self) -> bool:
        return bool(self.signed_in)

    def test(self) -> None:
        self.test_result.setStyleSheet("")
        self.test_result.setText("Connecting…")

        def ok(message: str) -> None:
            self.test_result.setStyleSheet(OK_STYLE)
            self.test_result.setText(message)

        def fail(message: str) -> None:
            self.test_result.setStyleSheet(ERROR_STYLE)
            self.test_result.setText(f"Could not reach the pool: {message}")

        self.w.run(test_connection(self.address.text().strip(), self.w.settings.insecure), ok,
                   fail)  # fmt: skip

    def sign_in(self) -> None:
        address_problem, account_error = self._problems()
        account = self.account.text().strip()
        if address_problem or account_error or not account or not self.password.text():
            self.result.setStyleSheet(ERROR_STYLE)
            self.result.setText("Enter a valid pool address, your account name and password.")
            return
        target = dataclasses.replace(
            self.w.settings, node_pool_address=self.address.text().strip(), account=account
        )
        self.sign_in_button.setEnabled(False)
        self.result.setStyleSheet("")
        self.result.setText("Signing in…")

        def ok(name: str) -> None:
            self.password.clear()
            self.sign_in_button.setEnabled(True)
            self.signed_in = name
            self.w.settings = target
            self.result.setStyleSheet(OK_STYLE)
            self.result.setText(f"Signed in as {name}. Press Next to go on.")
            self.completeChanged.emit()
            self.w.button(QWizard.WizardButton.NextButton).setFocus()

        def fail(message: str) -> None:
            self.sign_in_button.setEnabled(True)
            self.result.setStyleSheet(ERROR_STYLE)
            self.result.setText(f"Could not sign in: {message}")

        self.w.run(log_in(target, self.w.credentials, account, self.password.text()), ok, fail)


class GivePage(QWizardPage):
    """CPU, memory and disk, with this machine's numbers; checked as typed."""

    FIELDS = (
        ("max_cpu_cores", "&Processor cores:"),
        ("max_memory_gb", "&Memory (GiB):"),
        ("max_disk_gb", "&Disk space (GiB):"),
    )

    def __init__(self, wizard: FirstRunWizard) -> None:
        super().__init__()
        self.w = wizard
        self.setTitle("What to give")
        cores = os.cpu_count() or 1
        memory = psutil.virtual_memory().total / GIB
        free = free_disk_gb(wizard.settings)
        self.free = free
        self.setSubTitle(
            f"This computer has {cores} processor cores, {memory:.1f} GiB of memory and "
            f"{free:.0f} GiB of free disk space. Tasks never use more than you allow here."
        )
        form = QFormLayout(self)
        s = wizard.settings
        suggested = {
            "max_cpu_cores": f"{max(1, cores // 2)}",
            "max_memory_gb": f"{max(1.0, round(memory / 4, 1)):g}",
            "max_disk_gb": f"{min(s.max_disk_gb, max(1.0, round(free / 4))):g}",
        }
        self.fields: dict[str, QLineEdit] = {}
        self.errors: dict[str, QLabel] = {}
        for key, text in self.FIELDS:
            field = QLineEdit(suggested[key])
            field.setMaximumWidth(100)
            field.textChanged.connect(self._check)
            label = QLabel(text)
            label.setBuddy(field)
            form.addRow(label, field)
            error = _wrapped("")
            error.setStyleSheet(ERROR_STYLE)
            error.hide()
            form.addRow("", error)
            self.fields[key], self.errors[key] = field, error
        self.warning = _wrapped("")
        self.warning.setStyleSheet(WARN_STYLE)
        form.addRow("", self.warning)
        self._check()

    def initializePage(self) -> None:
        self.fields["max_cpu_cores"].setFocus()

    def values(self) -> dict[str, Any]:
        """The checked values, or ConfigError for the first bad one."""
        return {
            key: check_setting(self.w.paths, key, field.text().strip())
            for key, field in self.fields.items()
        }

    def _check(self) -> None:
        for key, field in self.fields.items():
            try:
                value = check_setting(self.w.paths, key, field.text().strip())
                problem = ""
                if key == "max_disk_gb" and value > self.free:
                    problem = f"expected no more than the free space ({self.free:.1f} GiB)"
            except ConfigError as exc:
                problem = _field_error(exc)
            self.errors[key].setText(problem)
            self.errors[key].setVisible(bool(problem))
            field.setAccessibleDescription(problem)
        problems: list[str] = []
        if self.isComplete():
            problems = cap_problems(dataclasses.replace(self.w.settings, **self.values()))
        self.warning.setText(f"No task can run: {' and '.join(problems)}." if problems else "")
        self.warning.setVisible(bool(problems))
        self.completeChanged.emit()  # after the errors are known: Next follows them

    def isComplete(self) -> bool:
        return not any(label.text() for label in self.errors.values())

    def validatePage(self) -> bool:
        if not self.isComplete():
            return False
        self.w.settings = dataclasses.replace(self.w.settings, **self.values())
        return True


class WhenPage(QWizardPage):
    def __init__(self, wizard: FirstRunWizard) -> None:
        super().__init__()
        self.w = wizard
        self.setTitle("When to contribute")
        self.setSubTitle("You can pause, snooze or stop at any time from the icon near the clock.")
        layout = QVBoxLayout(self)
        self.start_at_login = QCheckBox("Start HiveMind Worker when I log &in to this computer")
        self.start_at_login.setChecked(True)
        self.start_on_launch = QCheckBox("Start &contributing as soon as the app opens")
        self.start_on_launch.setChecked(True)
        layout.addWidget(self.start_at_login)
        layout.addWidget(self.start_on_launch)
        self.preset = QComboBox()
        self.preset.addItems([ALWAYS, AWAY])
        label = QLabel("Contribute &when:")
        label.setBuddy(self.preset)
        row = QHBoxLayout()
        row.addWidget(label)
        row.addWidget(self.preset, 1)
        layout.addLayout(row)
        layout.addWidget(
            _wrapped(
                "Either way the app steps aside on battery, during games and full-screen "
                "apps, and while other programs are busy. Settings → When to contribute "
                "has every rule."
            )
        )
        layout.addStretch(1)

    def initializePage(self) -> None:
        self.start_at_login.setFocus()

    def validatePage(self) -> bool:
        self.w.settings = dataclasses.replace(
            self.w.settings,
            start_at_login=self.start_at_login.isChecked(),
            start_on_launch=self.start_on_launch.isChecked(),
        )
        preset = PRESETS[self.preset.currentText()]
        self.w.settings = dataclasses.replace(self.w.settings, **preset)
        return True


class DockerPage(QWizardPage):
    def __init__(self, wizard: FirstRunWizard, capability: str) -> None:
        super().__init__()
        self.setTitle("How tasks are kept apart from your files")
        layout = QVBoxLayout(self)
        self.text = _wrapped("")
        layout.addWidget(self.text)
        layout.addStretch(1)
        self.set_capability(capability)

    def set_capability(self, capability: str) -> None:
        """What the engine chose: "docker", "process", or "" while it is still looking."""
        if capability == "docker":
            text = (
                "<p><b>Docker is installed and running.</b> Each task runs in its own "
                "container: the safest way, and every kind of task can run here.</p>"
            )
        elif not capability:
            text = "<p>Looking for Docker on this computer…</p>"
        else:
            text = (
                "<p><b>Docker was not found</b>, so tasks run in the app's built-in sandbox. "
                "That is safe for the simple tasks it accepts, but tasks that need a container "
                "are left for other computers.</p>"
                f'<p>To run every kind of task, <a href="{DOCKER_INSTALL_URL}">install Docker'
                "</a>, then restart this app. You can also do that later.</p>"
            )
        self.text.setText(text)


class DonePage(QWizardPage):
    def __init__(self, wizard: FirstRunWizard) -> None:
        super().__init__()
        self.setTitle("All set")
        layout = QVBoxLayout(self)
        layout.addWidget(
            _wrapped(
                "<p>Press <b>Finish</b> to save these choices. The dashboard then shows what "
                "this computer is doing; Settings changes any of it.</p>"
            )
        )
        self.start_now = QCheckBox("Start contributing &now")
        self.start_now.setChecked(True)
        layout.addWidget(self.start_now)
        layout.addStretch(1)


class FirstRunWizard(QWizard):
    """Collects settings page by page; `done` hands them over with whether to start now."""

    completed = Signal(object, bool)  # Settings, start now

    def __init__(
        self,
        settings: Settings,
        paths: Paths,
        credentials: CredentialStore,
        engine_thread: EngineThread,
        capability: str,
        parent: QWidget | None = None,
    ) -> None:
        super().__init__(parent)
        self.setWindowTitle("Set up HiveMind Worker")
        self.setWizardStyle(QWizard.WizardStyle.ClassicStyle)
        self.setOption(QWizard.WizardOption.NoBackButtonOnStartPage)
        self.setMinimumSize(620, 480)
        self.settings = settings
        self.paths = paths
        self.credentials = credentials
        self.engine_thread = engine_thread
        self.calls = Calls(engine_thread, self)
        self.welcome = WelcomePage()
        self.pool = PoolPage(self)
        self.give = GivePage(self)
        self.when = WhenPage(self)
        self.docker = DockerPage(self, capability)
        self.done_page = DonePage(self)
        for page in (self.welcome, self.pool, self.give, self.when, self.docker, self.done_page):
            self.addPage(page)

    def run(self, coro: Any, on_ok: Callable[[Any], None], on_fail: Callable[[str], None]) -> None:
        """Off the GUI thread, on the engine's loop; the answer comes back as a signal."""
        self.calls.run(coro, on_ok, on_fail)

    def accept(self) -> None:
        self.completed.emit(self.settings, self.done_page.start_now.isChecked())
        super().accept()
