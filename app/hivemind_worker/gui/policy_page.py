"""Settings: the "When to contribute" page, presets and rules in plain words, checked as typed.

One field per setting of engine/policy.py (declared in config.py); `check_setting` checks each.
"""

from __future__ import annotations

from typing import Any

from PySide6.QtCore import Signal
from PySide6.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QWidget,
)

from hivemind_worker.config import ConfigError, Settings, check_setting
from hivemind_worker.paths import Paths

# (key, words before the field, words after it); a field of None is a check box.
RULES: tuple[tuple[str, str, str], ...] = (
    ("idle_only_minutes", "Only after I have been away for", "minutes (0: also while I work)"),
    ("suspend_on_battery", "Pause while the computer runs on battery", ""),
    ("battery_below_percent", "…but only once the charge is below", "% (0: at any charge)"),
    ("other_cpu_percent", "Pause while other programs use more than", "% of the processor"),
    ("other_cpu_suspend_seconds", "…for longer than", "seconds"),
    ("other_cpu_resume_seconds", "…and go on once they are quiet for", "seconds"),
    ("suspend_fullscreen", "Pause while a full-screen app or game is in front", ""),
    ("schedule", "Only at these times", "(empty: at any time)"),
    ("memory_low_percent", "Pause when less than", "% of memory is free (0: never)"),
    ("cpu_time_percent", "Use at most", "% of the processor's time"),
    ("give_back_minutes", "Hand paused tasks back to the pool after", "minutes (0: keep them)"),
)
POLICY_KEYS = tuple(key for key, _, _ in RULES)
BOOL_KEYS = frozenset({"suspend_on_battery", "suspend_fullscreen"})

ALWAYS, AWAY, CUSTOM = "Always, courteously", "Only when I'm away", "Custom"
# Presets set every rule; "courteously" means stepping aside for battery, games, busy
# programs and low memory, as the settings' own defaults do.
PRESETS: dict[str, dict[str, Any]] = {
    ALWAYS: {
        "idle_only_minutes": 0.0,
        "suspend_on_battery": True,
        "battery_below_percent": 0,
        "other_cpu_percent": 25,
        "other_cpu_suspend_seconds": 10,
        "other_cpu_resume_seconds": 30,
        "suspend_fullscreen": True,
        "schedule": "",
        "memory_low_percent": 10,
        "cpu_time_percent": 100,
        "give_back_minutes": 30.0,
    },
}
PRESETS[AWAY] = {**PRESETS[ALWAYS], "idle_only_minutes": 5.0}


def _text(value: Any) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


class PolicyPage(QWidget):
    """One field per rule; `errors` holds what is wrong, beside each field."""

    changed = Signal()

    def __init__(self, paths: Paths, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        self.paths = paths
        self.errors: dict[str, str] = {}
        self._filling = False
        form = QFormLayout(self)
        self.preset = QComboBox()
        self.preset.addItems([ALWAYS, AWAY, CUSTOM])
        self.preset.setAccessibleName("When to contribute")
        self.preset.activated.connect(self._preset_chosen)
        label = QLabel("&Contribute:")
        label.setBuddy(self.preset)
        form.addRow(label, self.preset)
        explain = QLabel(
            "A pause freezes running tasks and takes no new ones; they go on where they were. "
            "Pause and Snooze by hand always win."
        )
        explain.setWordWrap(True)
        form.addRow("", explain)
        self.fields: dict[str, QLineEdit | QCheckBox] = {}
        self._error_labels: dict[str, QLabel] = {}
        for key, before, after in RULES:
            if key in BOOL_KEYS:
                check = QCheckBox(before)
                check.toggled.connect(self._edited)
                self.fields[key] = check
                form.addRow("", check)
                continue
            field = QLineEdit()
            field.setAccessibleName(f"{before} … {after}".strip(" …"))
            field.textChanged.connect(self._edited)
            self.fields[key] = field
            words = QLabel(before)
            words.setBuddy(field)
            # One line each: a wrapped label in a form row is given one line's height and
            # clipped (seen in the screenshots); the dialog grows to fit instead.
            row = QHBoxLayout()
            if key == "schedule":
                field.setPlaceholderText("e.g. mon-fri 18:00-08:00; sat-sun 00:00-24:00")
                metrics = field.fontMetrics()  # the example whole, not cut off
                field.setMinimumWidth(metrics.horizontalAdvance(field.placeholderText()) + 24)
                row.addWidget(field, 1)
            else:
                field.setMaximumWidth(70)
                row.addWidget(field)
            unit = QLabel(after)
            row.addWidget(unit, 1)
            form.addRow(words, row)
            error = QLabel()
            error.setStyleSheet("color: #d64541;")
            error.setWordWrap(True)
            error.hide()
            self._error_labels[key] = error
            form.addRow("", error)

    def load(self, settings: Settings) -> None:
        self._filling = True
        for key in POLICY_KEYS:
            value = getattr(settings, key)
            field = self.fields[key]
            if isinstance(field, QCheckBox):
                field.setChecked(bool(value))
            else:
                field.setText(_text(value))
        self._filling = False
        self._edited()

    def raw_values(self) -> dict[str, Any]:
        """What is in the fields, as typed: check_setting parses the text."""
        return {
            key: field.isChecked() if isinstance(field, QCheckBox) else field.text().strip()
            for key, field in self.fields.items()
        }

    def validate(self) -> dict[str, str]:
        self.errors = {}
        for key, raw in self.raw_values().items():
            try:
                check_setting(self.paths, key, raw)
            except ConfigError as exc:
                message = str(exc)
                at = message.find("): ")
                self.errors[key] = message[at + 3 :] if at >= 0 else message
        for key, label in self._error_labels.items():
            text = self.errors.get(key, "")
            label.setText(text)
            label.setVisible(bool(text))
            field = self.fields[key]
            field.setAccessibleDescription(text)
            field.setStyleSheet("border: 1px solid #d64541;" if text else "")
        return self.errors

    def values(self) -> dict[str, Any]:
        """The checked values (call validate() first; ConfigError if one is bad)."""
        return {key: check_setting(self.paths, key, raw) for key, raw in self.raw_values().items()}

    def _matching_preset(self) -> str:
        if self.errors:
            return CUSTOM
        values = self.values()
        for name, preset in PRESETS.items():
            if all(values[k] == v for k, v in preset.items()):
                return name
        return CUSTOM

    def _preset_chosen(self, index: int) -> None:
        name = self.preset.itemText(index)
        if name in PRESETS:
            self._filling = True
            for key, value in PRESETS[name].items():
                field = self.fields[key]
                if isinstance(field, QCheckBox):
                    field.setChecked(bool(value))
                else:
                    field.setText(_text(value))
            self._filling = False
            self._edited()

    def _edited(self, *_: object) -> None:
        if self._filling:
            return
        self.validate()
        self.preset.setCurrentText(self._matching_preset())
        self.changed.emit()
