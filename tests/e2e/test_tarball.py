"""The Linux tarball: install.sh into a temporary HOME, run it, uninstall.sh, nothing left."""

from __future__ import annotations

import sys
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest
from artefacts import clean_env, run

from hivemind_worker import __version__

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.timeout(300),
    pytest.mark.skipif(sys.platform != "linux", reason="the tarball is for Linux"),
]


def tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_install_run_uninstall(
    artefact: Callable[[str], Path], need_tool: Callable[[str], str], tmp_path: Path
) -> None:
    archive = artefact("hivemind-worker-*-linux-*.tar.gz")
    validate = need_tool("desktop-file-validate")
    unpacked = tmp_path / "unpacked"
    with tarfile.open(archive) as tar:
        tar.extractall(unpacked, filter="data")
    (top,) = unpacked.iterdir()
    home = tmp_path / "home"
    home.mkdir()
    before = tree(home)
    env = clean_env(home)
    # Runs in place too, without installing (the tarball's README says so).
    in_place = run([top / "hivemind-worker", "--version"], env=env)
    assert in_place.stdout.strip() == f"hivemind-worker {__version__}", in_place.stderr

    done = run(["sh", top / "install.sh", "--autostart"], env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    binary = home / ".local/bin/hivemind-worker"
    version = run([binary, "--version"], env=env)
    assert version.stdout.strip() == f"hivemind-worker {__version__}", version.stderr
    entries = [
        home / ".local/share/applications/hivemind-worker.desktop",
        home / ".config/autostart/hivemind-worker.desktop",
    ]
    for entry in entries:
        valid = run([validate, entry])
        assert valid.returncode == 0 and not valid.stdout.strip(), valid.stdout
    assert (home / ".local/share/icons/hicolor/48x48/apps/hivemind-worker.png").is_file()
    # The one-folder build, which starts without unpacking itself.
    assert (home / ".local/lib/hivemind-worker/_internal/base_library.zip").is_file()

    # Installing again is an upgrade: same files, and uninstall still removes them all.
    again = run(["sh", top / "install.sh"], env=env)
    assert again.returncode == 0, again.stderr

    gone = run([home / ".local/lib/hivemind-worker/uninstall.sh"], env=env)
    assert gone.returncode == 0, gone.stdout + gone.stderr
    assert tree(home) == before, f"left behind: {sorted(tree(home) - before)}"


def test_uninstall_keeps_settings_and_data(artefact: Callable[[str], Path], tmp_path: Path) -> None:
    archive = artefact("hivemind-worker-*-linux-*.tar.gz")
    with tarfile.open(archive) as tar:
        tar.extractall(tmp_path / "unpacked", filter="data")
    (top,) = (tmp_path / "unpacked").iterdir()
    home = tmp_path / "home"
    settings = home / ".config/hivemind-worker/settings.toml"
    settings.parent.mkdir(parents=True)
    settings.write_text("max_cpu_cores = 2\n")
    env = clean_env(home)
    assert run(["sh", top / "install.sh"], env=env).returncode == 0
    assert run([home / ".local/lib/hivemind-worker/uninstall.sh"], env=env).returncode == 0
    assert settings.read_text() == "max_cpu_cores = 2\n"
    assert not (home / ".local/lib/hivemind-worker").exists()
