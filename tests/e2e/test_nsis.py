"""The Windows installer: compiled here by `build.py nsis`, inspected, and run under Wine.

The real app is built on Windows (the release workflow's Windows job runs the same checks
against it). Here the installer packages a stand-in app whose exe is itself a tiny NSIS
program that sleeps, so "the app is running" is a real running Windows process holding its
exe, as on Windows. Wine runs 64-bit programs only without i386 multiarch, so the scenario
compiles the same script for amd64 (`--target amd64-unicode`); the release is x86.
"""

from __future__ import annotations

import getpass
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from artefacts import ROOT, run, unavailable

from hivemind_worker import __version__

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(600)]

PACKAGING = ROOT / "installer" / "packaging.py"
ARTWORK = ROOT / "build" / "nsis" / "artwork"
UNINSTKEY = r"HKCU\Software\Microsoft\Windows\CurrentVersion\Uninstall\HiveMindWorker"
EXIT_RUNNING, EXIT_DOWNGRADE = 3, 4


def build_setup(out_dir: Path, *extra: str) -> Path:
    """`build.py nsis` as the release runs it, into out_dir; returns the setup.exe."""
    done = run([sys.executable, PACKAGING, "nsis", "--out-dir", out_dir, *extra], timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    (setup,) = out_dir.glob("hivemind-worker-*-setup.exe")
    return setup


@pytest.fixture
def makensis(need_tool: Callable[[str], str]) -> str:
    return need_tool("makensis")


def test_nsis_script_compiles(makensis: str, tmp_path: Path) -> None:
    setup = build_setup(tmp_path)
    assert setup.name == f"hivemind-worker-{__version__}-setup.exe"
    assert setup.read_bytes()[:2] == b"MZ"


def test_wizard_shows_the_products_artwork(
    makensis: str, need_tool: Callable[[str], str], tmp_path: Path
) -> None:
    """The welcome/finish sidebar and the page header inside the installer are ours, drawn
    from the app icon at the sizes Modern UI wants, not NSIS's stock bitmaps."""
    from PIL import Image

    seven_zip = need_tool("7z")  # reads NSIS installers, as a person inspecting one would
    setup = build_setup(tmp_path / "out")
    unpacked = tmp_path / "unpacked"
    done = run([seven_zip, "x", f"-o{unpacked}", setup], timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    plugins = unpacked / "$PLUGINSDIR"
    with Image.open(ROOT / "resources/icons/hivemind-worker-256.png") as icon:
        counted = icon.convert("RGBA").getcolors(maxcolors=1 << 16) or []
    icon_colour = max((n, c) for n, c in counted if c[3] == 255 and c[:3] != (255, 255, 255))
    for name, ours, size in (
        ("modern-wizard.bmp", ARTWORK / "wizard.bmp", (164, 314)),
        ("modern-header.bmp", ARTWORK / "header.bmp", (150, 57)),
    ):
        shipped = plugins / name
        assert shipped.read_bytes() == ours.read_bytes(), f"{name} is not the product's artwork"
        with Image.open(shipped) as image:
            assert image.size == size
            # Drawn from the icon: its main colour is in there.
            colours = {c for _, c in image.convert("RGB").getcolors(maxcolors=1 << 16) or []}
            assert icon_colour[1][:3] in colours, f"{name}: no trace of the icon"
    stock = Path("/usr/share/nsis/Contrib/Graphics/Wizard/win.bmp")
    if stock.exists():
        assert (plugins / "modern-wizard.bmp").read_bytes() != stock.read_bytes()
    assert (unpacked / "_internal").is_dir(), "the installer must ship the one-folder app"


# ---------------------------------------------------------------------------- under Wine


class Wine:
    """One throw-away Wine prefix, and the installer's view of it."""

    def __init__(self, wine: str, prefix: Path) -> None:
        self.wine = wine
        self.prefix = prefix
        # No display: silent runs need none, and a stray dialog then fails instead of waiting.
        hidden = ("DISPLAY", "WAYLAND_DISPLAY")
        self.env = {k: v for k, v in os.environ.items() if k not in hidden}
        self.env.update(
            WINEPREFIX=str(prefix),
            WINEDEBUG="-all",
            WINEDLLOVERRIDES="mscoree,mshtml=",  # no Mono/Gecko install prompts
        )
        home = prefix / "drive_c/users" / getpass.getuser()  # Wine names it after the login
        self.install_dir = home / "AppData/Local/Programs/HiveMind Worker"
        self.temp = home / "Temp"

    def run(self, *args: str | Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [self.wine, *(str(a) for a in args)],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )

    def registered(self, value: str) -> str | None:
        done = self.run("reg", "query", UNINSTKEY, "/v", value)
        for line in done.stdout.splitlines():
            if line.strip().startswith(value):
                return line.split("REG_SZ", 1)[1].strip()
        return None

    def run_command_line(self, command_line: str) -> int:
        """A command line exactly as Windows would get it from the registry (via cmd)."""
        batch = self.prefix / "drive_c" / "command.bat"
        batch.write_text(f"{command_line}\r\nexit /b %errorlevel%\r\n")
        return self.run("cmd", "/c", r"C:\command.bat").returncode

    def failure_log(self) -> str:
        log = self.temp / "hivemind-worker-setup.log"
        return log.read_text(errors="replace") if log.exists() else ""


@pytest.fixture
def wine(tmp_path: Path) -> Iterator[Wine]:
    found = shutil.which("wine64") or shutil.which("wine")
    if found is None and Path("/usr/lib/wine/wine64").exists():
        found = "/usr/lib/wine/wine64"  # Debian's wine64 package without the wine wrapper
    if found is None:
        unavailable("Wine is not installed (Debian: apt-get install wine64)")
    box = Wine(str(found), tmp_path / "prefix")
    booted = box.run("wineboot", "--init", timeout=300)
    assert booted.returncode == 0, booted.stderr
    try:
        yield box
    finally:
        # Ends this prefix's wineserver and every program still running in it.
        subprocess.run(
            [str(Path(box.wine).parent / "wineserver"), "-k"]
            if (Path(box.wine).parent / "wineserver").exists()
            else ["wineserver", "-k"],
            env=box.env,
            check=False,
            timeout=60,
        )


def stand_in_app(makensis: str, out: Path) -> Path:
    """A one-folder app whose hivemind-worker.exe is a real Windows program that sleeps.

    Once running it leaves %TEMP%\\stand-in-running.txt, so the test knows its image is
    mapped (and so locked) without sleeping on a guess.
    """
    (out / "_internal").mkdir(parents=True)
    (out / "_internal" / "library.txt").write_text("stands for Python, Qt and friends\n")
    script = out.parent / "stand-in.nsi"
    script.write_text(
        "Unicode true\nTarget amd64-unicode\nSilentInstall silent\n"
        "RequestExecutionLevel user\n"
        f'OutFile "{out / "hivemind-worker.exe"}"\n'
        "Section\n"
        '  FileOpen $0 "$TEMP\\stand-in-running.txt" w\n  FileClose $0\n'
        "  Sleep 300000\nSectionEnd\n"
    )
    done = run([makensis, "-V2", script])
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def test_installer_under_wine_with_a_stand_in_app(
    makensis: str, wine: Wine, tmp_path: Path
) -> None:
    """Install, upgrade, a refused downgrade, and uninstall refusing while the app runs:
    each silent (/S), each with the exit code and reason a deployment tool would read."""
    app = stand_in_app(makensis, tmp_path / "app")
    amd64 = ["--target", "amd64-unicode", "--stand-in", str(app)]
    older = build_setup(tmp_path / "older", *amd64, "--as-version", "0.0.1")
    current = build_setup(tmp_path / "current", *amd64)
    exe = wine.install_dir / "hivemind-worker.exe"

    done = wine.run(older, "/S")
    assert done.returncode == 0, done.stderr
    assert exe.is_file() and (wine.install_dir / "_internal" / "library.txt").is_file()
    assert wine.registered("DisplayVersion") == "0.0.1"

    done = wine.run(current, "/S")
    assert done.returncode == 0, f"upgrade: {done.returncode} {wine.failure_log()}"
    assert wine.registered("DisplayVersion") == __version__

    done = wine.run(older, "/S")
    assert done.returncode == EXIT_DOWNGRADE, "a silent downgrade must be refused"
    assert wine.registered("DisplayVersion") == __version__
    assert "/ALLOWDOWNGRADE" in wine.failure_log()

    done = wine.run(older, "/S", "/ALLOWDOWNGRADE")
    assert done.returncode == 0, wine.failure_log()
    assert wine.registered("DisplayVersion") == "0.0.1"
    assert wine.run(current, "/S").returncode == 0

    quiet = wine.registered("QuietUninstallString")
    assert quiet is not None and "/S" in quiet
    running = subprocess.Popen([wine.wine, str(exe)], env=wine.env)
    try:
        started = wine.temp / "stand-in-running.txt"
        for _ in range(120):
            if started.exists():
                break
            time.sleep(0.5)
        assert started.exists(), "the stand-in app did not start under Wine"
        assert wine.run_command_line(quiet) == EXIT_RUNNING
        assert exe.is_file(), "a refused uninstall must leave the app in place"
        assert wine.registered("DisplayVersion") == __version__
        assert wine.run(current, "/S").returncode == EXIT_RUNNING, "upgrade over a running app"
        assert "is running" in wine.failure_log()
    finally:
        running.kill()
        running.wait(timeout=30)

    assert wine.run_command_line(quiet) == 0, wine.failure_log()
    assert wine.registered("DisplayVersion") is None
    # The uninstaller's helper removes uninstall.exe and the folder once it has exited.
    for _ in range(60):
        if not wine.install_dir.exists():
            break
        time.sleep(0.5)
    assert not wine.install_dir.exists(), sorted(p.name for p in wine.install_dir.iterdir())
