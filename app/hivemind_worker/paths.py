"""Every file-system location the worker uses, from platformdirs or one override root."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from platformdirs import PlatformDirs

APP_NAME = "hivemind-worker"
APP_AUTHOR = "HiveMind"
HOME_ENV = "HIVEMIND_HOME"


@dataclass(frozen=True)
class Paths:
    config_dir: Path
    data_dir: Path
    cache_dir: Path
    log_dir: Path

    @property
    def settings_file(self) -> Path:
        return self.config_dir / "settings.toml"

    @property
    def work_dir(self) -> Path:
        """Default parent of task workspaces."""
        return self.data_dir / "work"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def state_file(self) -> Path:
        """Runtime state written by the worker itself; settings live in settings_file."""
        return self.data_dir / "state.json"

    def ensure(self) -> None:
        """Create every directory; config and data hold tokens and ids, so owner-only."""
        for private in (self.config_dir, self.data_dir):
            private.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.chmod(private, 0o700)
        for public in (self.cache_dir, self.log_dir, self.work_dir, self.outbox_dir):
            public.mkdir(parents=True, exist_ok=True)


def default_paths(root: Path | None = None) -> Paths:
    """Paths under `root` (or $HIVEMIND_HOME) if given, else the platform's user dirs."""
    if root is None and os.environ.get(HOME_ENV):
        root = Path(os.environ[HOME_ENV])
    if root is not None:
        root = root.expanduser().absolute()
        return Paths(
            config_dir=root / "config",
            data_dir=root / "data",
            cache_dir=root / "cache",
            log_dir=root / "logs",
        )
    dirs = PlatformDirs(APP_NAME, APP_AUTHOR)
    return Paths(
        config_dir=dirs.user_config_path,
        data_dir=dirs.user_data_path,
        cache_dir=dirs.user_cache_path,
        log_dir=dirs.user_log_path,
    )
