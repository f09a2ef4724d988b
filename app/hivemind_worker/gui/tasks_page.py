"""Settings: the "Kinds of tasks" page, one switch per runner kind with what it downloads.

Each kind runs in an environment of its own that is downloaded the first time a task of that
kind comes; TensorFlow and PyTorch are large, so they stay off until the person turns them on.
The sizes are measured per platform (engine/runners/requirements/download-sizes.toml).
"""

from __future__ import annotations

from PySide6.QtWidgets import QCheckBox, QGroupBox, QLabel, QVBoxLayout, QWidget

from hivemind_worker.config import Settings
from hivemind_worker.engine.runners import DATA_ENVIRONMENT, download_mb

# (setting, the switch's words, the environment it downloads)
KINDS: tuple[tuple[str, str, str], ...] = (
    ("ml_scikit_learn", "scikit-learn: classic machine learning", "scikit-learn"),
    ("ml_tensorflow", "TensorFlow: neural networks", "tensorflow"),
    ("ml_pytorch", "PyTorch: neural networks", "pytorch"),
    ("data_processing", "Data processing: tables, images and texts", DATA_ENVIRONMENT),
)


def download_words(megabytes: int) -> str:
    """'about 360 MB', 'about 1.3 GB': an estimate, so rounded (to 10 MB, or 0.1 GB)."""
    if megabytes >= 1000:
        return f"about {megabytes / 1000:.1f} GB"
    return f"about {max(round(megabytes, -1), 10)} MB"


class TasksPage(QWidget):
    """A switch per kind of task; `switches` maps each setting to its check box."""

    def __init__(self, parent: QWidget | None = None) -> None:
        super().__init__(parent)
        layout = QVBoxLayout(self)
        box = QGroupBox("Kinds of tasks")
        inner = QVBoxLayout(box)
        explain = QLabel(
            "Each kind downloads its software once, when its first task arrives. "
            "A change applies to the next tasks offered."
        )
        explain.setWordWrap(True)
        inner.addWidget(explain)
        self.switches: dict[str, QCheckBox] = {}
        self.sizes: dict[str, QLabel] = {}
        for key, words, environment in KINDS:
            switch = QCheckBox(words)
            words_of_size = download_words(download_mb(environment))
            size = QLabel(f"{words_of_size[0].upper()}{words_of_size[1:]} download.")
            # Under the switch's words, past its box; in the normal text colour (a disabled
            # label's grey was too faint to read on the screenshots).
            size.setIndent(24)
            switch.setAccessibleDescription(size.text())
            inner.addWidget(switch)
            inner.addWidget(size)
            self.switches[key] = switch
            self.sizes[key] = size
        layout.addWidget(box)
        layout.addStretch(1)

    def load(self, settings: Settings) -> None:
        for key, switch in self.switches.items():
            switch.setChecked(bool(getattr(settings, key)))

    def raw_values(self) -> dict[str, bool]:
        return {key: switch.isChecked() for key, switch in self.switches.items()}
