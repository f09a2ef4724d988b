"""The one-file executable alone: its version, both CLIs, and the headless demo end to end."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable
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


def test_token_goes_to_the_secret_service(
    binary: Path, need_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """keyring finds its backends through entry points and SecretStorage needs cryptography's
    cffi backend: a frozen build loses either easily, and then silently falls back to a
    plaintext file. Here a real gnome-keyring on a private D-Bus must get the demo's token.
    """
    for tool in ("dbus-run-session", "gnome-keyring-daemon", "secret-tool"):
        need_tool(tool)
    home = tmp_path / "home"
    home.mkdir()
    data = home / "data"
    script = (
        'printf "test-password" | gnome-keyring-daemon --unlock --components=secrets >/dev/null'
        f' && "{binary}" --data-dir "{data}" demo --headless --tasks 1'
        " && secret-tool search --all service hivemind-worker"
    )
    done = run(["dbus-run-session", "--", "sh", "-c", script], env=clean_env(home))
    report = done.stdout + done.stderr
    assert done.returncode == 0, report
    assert "PLAINTEXT" not in report and "Error initializing plugin" not in report, report
    assert "secret = " in done.stdout, report
    assert not (data / "data" / "credentials.cfg").exists()


def test_plaintext_fallback_without_a_keyring(binary: Path, tmp_path: Path) -> None:
    """No Secret Service at all: keyrings.alt's file store, bundled too, takes the token."""
    home = tmp_path / "home"
    home.mkdir()
    demo = [binary, "--data-dir", home / "data", "demo", "--headless", "--tasks", "1"]
    done = run(demo, env=clean_env(home))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "Error initializing plugin" not in done.stderr, done.stderr
    assert (home / "data" / "data" / "credentials.cfg").is_file()


def test_headless_demo_completes_every_task(binary: Path, tmp_path: Path) -> None:
    check_demo(binary, tmp_path)


@pytest.mark.timeout(900)  # on a fresh machine uv downloads the environment (~90 MB) here first
def test_the_bundled_uv_builds_the_data_runners_environment(binary: Path, tmp_path: Path) -> None:
    """The runner programs, their requirement sets and uv travel in the binary: with only the
    system's PATH, the demo's data sample gets its environment built and runs."""
    # A folder tasks can reach when they run as nobody (a root worker's tasks do, and pytest's
    # own temporary folders are 0700); the work folder in it 0700, as the worker's first
    # workspace makes it: the worker must open it to its tasks itself.
    home = Path(tempfile.mkdtemp(prefix="hivemind-e2e-", dir="/var/tmp"))
    home.chmod(0o755)
    (home / "work").mkdir(mode=0o700)
    # The machine's uv cache spares a second download (the e2e tier runs before the
    # integration tier, so on a fresh machine this test fills it).
    cache = os.environ.get("UV_CACHE_DIR") or str(Path.home() / ".cache" / "uv")
    env = clean_env(home, HIVEMIND_DATA_PROCESSING="true", UV_CACHE_DIR=cache)
    demo = [binary, "--data-dir", home / "data", "demo", "--headless", "--tasks", "1",
            "--work-dir", home / "work"]  # fmt: skip
    try:
        done = run(demo, env=env, timeout=840)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    report = f"exit {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert done.returncode == 0, report
    assert "Done: 2 of 2 tasks succeeded." in done.stdout, report
    assert "sales by region (csv analysis): preparing: data: building the data environment" in (
        done.stdout
    ), report
    assert "sales by region (csv analysis): sales.csv: 2000 rows, 4 columns" in done.stdout
    assert "random forest on iris (scikit-learn): skipped, ml:scikit-learn tasks are off" in (
        done.stdout
    )


@pytest.mark.skipif(sys.platform != "linux", reason="an X11 test")
def test_desktop_app_starts_on_x11(
    binary: Path, need_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """The GUI from the frozen binary on a real X server (xcb plugin, bundled X libraries).

    Hidden imports that only the GUI needs (pyqtgraph asks for QtOpenGL by a computed name)
    fail here and nowhere else. It must still be running after a few seconds.
    """
    xvfb_run = need_tool("xvfb-run")
    home = tmp_path / "home"
    home.mkdir()
    log = tmp_path / "gui.log"
    with log.open("w") as out:
        proc = subprocess.Popen(
            [xvfb_run, "-a", str(binary), "--data-dir", str(home / "data"), "gui"],
            env=clean_env(home),
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # xvfb-run, Xvfb and the app: stopped together below
        )
        try:
            exited = proc.wait(timeout=8)
        except subprocess.TimeoutExpired:
            exited = None
        finally:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    output = log.read_text()
    assert exited is None, f"the app exited with {exited}:\n{output}"
    assert "cannot start" not in output and "Traceback" not in output, output
