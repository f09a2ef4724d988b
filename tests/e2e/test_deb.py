"""The .deb on this machine: install, run, a valid desktop entry, and a clean removal."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from artefacts import CI, check_demo, clean_env, run, unavailable

from hivemind_worker import __version__

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]
PACKAGE = "hivemind-worker"


def installed() -> bool:
    done = run(["dpkg-query", "-W", "-f=${Status}", PACKAGE])
    return done.returncode == 0 and "ok installed" in done.stdout


def test_install_run_remove(
    artefact: Callable[[str], Path], need_tool: Callable[[str], str], tmp_path: Path
) -> None:
    deb = artefact("hivemind-worker_*.deb")
    need_tool("dpkg")
    validate = need_tool("desktop-file-validate")
    if os.geteuid() != 0:
        unavailable("installing a .deb needs root")
    if installed() and not CI:
        pytest.skip(f"{PACKAGE} is already installed here; not touching it")

    done = run(["dpkg", "-i", deb], timeout=300)
    assert done.returncode == 0, f"dpkg -i failed (are its Depends installed?):\n{done.stderr}"
    try:
        files = run(["dpkg", "-L", PACKAGE]).stdout.split()
        assert "/usr/lib/hivemind-worker/hivemind-worker" in files
        # The one-folder build, which starts without unpacking itself.
        assert "/usr/lib/hivemind-worker/_internal/base_library.zip" in files

        version = run(["/usr/bin/hivemind-worker", "--version"], env=clean_env(tmp_path))
        assert version.stdout.strip() == f"hivemind-worker {__version__}", version.stderr

        desktop = "/usr/share/applications/hivemind-worker.desktop"
        assert desktop in files
        valid = run([validate, desktop])
        assert valid.returncode == 0 and not valid.stdout.strip(), valid.stdout + valid.stderr
        for size in (16, 32, 48, 128, 256):
            assert f"/usr/share/icons/hicolor/{size}x{size}/apps/hivemind-worker.png" in files
        metainfo = [f for f in files if f.startswith("/usr/share/metainfo/")]
        assert metainfo, "no AppStream metainfo"
        appstream = run([need_tool("appstreamcli"), "validate", "--no-net", *metainfo])
        assert appstream.returncode == 0, appstream.stdout + appstream.stderr

        home = tmp_path / "home"
        home.mkdir()
        check_demo("/usr/bin/hivemind-worker", home)
        user_data = sorted(p for p in home.rglob("*") if p.is_file())
        assert user_data, "the demo left no data to keep"
    finally:
        removed = run(["dpkg", "-r", PACKAGE], timeout=300)
    assert removed.returncode == 0, removed.stderr

    left = [f for f in files if Path(f).is_symlink() or (Path(f).exists() and not Path(f).is_dir())]
    assert not left, f"dpkg -r left package files behind: {left}"
    ours = ("/usr/lib/hivemind-worker", "/usr/share/doc/hivemind-worker")
    assert not [d for d in ours if Path(d).exists()], "package directories left behind"
    # Removal is not purge: the person's settings and data stay where they were.
    assert all(p.exists() for p in user_data)
    purged = run(["dpkg", "--purge", PACKAGE])
    assert purged.returncode == 0, purged.stderr
    assert not installed()


def test_lintian_reports_no_errors(
    artefact: Callable[[str], Path], need_tool: Callable[[str], str]
) -> None:
    deb = artefact("hivemind-worker_*.deb")
    done = run([need_tool("lintian"), "--tag-display-limit", "0", deb], timeout=300)
    errors = [line for line in done.stdout.splitlines() if line.startswith("E:")]
    assert not errors, done.stdout
