"""The one-file executable alone: its version, both CLIs, and the headless demo end to end."""

from __future__ import annotations

from pathlib import Path

import pytest
from artefacts import check_demo, clean_env, run

from hivemind_worker import __version__

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]


def test_version_comes_from_the_package_metadata(binary: Path, tmp_path: Path) -> None:
    done = run([binary, "--version"], env=clean_env(tmp_path))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"hivemind-worker {__version__}"


def test_one_binary_carries_every_command(binary: Path, tmp_path: Path) -> None:
    env = clean_env(tmp_path)
    for args in (["run", "--help"], ["demo", "--help"], ["doctor", "--help"], ["pool", "--help"]):
        done = run([binary, *args], env=env)
        assert done.returncode == 0, f"{args}: {done.stderr}"
        assert "usage:" in done.stdout


def test_keyring_backends_are_bundled(binary: Path, tmp_path: Path) -> None:
    """keyring finds its backends through entry points; a frozen build loses them easily.

    Without a Secret Service here the worker falls back to keyrings.alt's file store, which
    it can only do if that backend was bundled too: `login` against the demo exercises it.
    """
    home = tmp_path / "home"
    home.mkdir()
    done = run([binary, "--data-dir", home / "data", "demo", "--tasks", "1"], env=clean_env(home))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "keyring" not in done.stderr.lower() or "plaintext" in done.stderr.lower()


def test_headless_demo_completes_every_task(binary: Path, tmp_path: Path) -> None:
    check_demo(binary, tmp_path)
