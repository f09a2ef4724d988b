"""Tests for hivemind_worker.paths."""

from __future__ import annotations

import stat
import sys
from pathlib import Path

import pytest

from hivemind_worker.paths import Paths, default_paths


def test_root_puts_everything_under_one_folder(tmp_path: Path) -> None:
    paths = default_paths(tmp_path)
    assert paths == Paths(
        config_dir=tmp_path / "config",
        data_dir=tmp_path / "data",
        cache_dir=tmp_path / "cache",
        log_dir=tmp_path / "logs",
    )
    assert paths.settings_file == tmp_path / "config" / "settings.toml"
    assert paths.work_dir == tmp_path / "data" / "work"
    assert paths.outbox_dir == tmp_path / "data" / "outbox"
    assert paths.state_file == tmp_path / "data" / "state.json"


def test_relative_root_becomes_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert default_paths(Path("dev")).data_dir == tmp_path / "dev" / "data"


def test_hivemind_home_env_is_the_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HIVEMIND_HOME", str(tmp_path))
    assert default_paths().config_dir == tmp_path / "config"
    assert default_paths(tmp_path / "flag").config_dir == tmp_path / "flag" / "config"


def test_platform_dirs_without_root(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("HIVEMIND_HOME", raising=False)
    paths = default_paths()
    for directory in (paths.config_dir, paths.data_dir, paths.cache_dir, paths.log_dir):
        assert directory.is_absolute()
        assert "hivemind-worker" in directory.parts


def test_ensure_creates_all_dirs_private_where_it_matters(tmp_path: Path) -> None:
    paths = default_paths(tmp_path)
    paths.ensure()
    paths.ensure()  # idempotent
    for directory in (
        paths.config_dir,
        paths.data_dir,
        paths.cache_dir,
        paths.log_dir,
        paths.work_dir,
        paths.outbox_dir,
    ):
        assert directory.is_dir()
    if sys.platform != "win32":
        assert stat.S_IMODE(paths.config_dir.stat().st_mode) == 0o700
        assert stat.S_IMODE(paths.data_dir.stat().st_mode) == 0o700
