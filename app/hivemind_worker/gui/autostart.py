"""Start at login: an XDG autostart entry on Linux, the HKCU Run key on Windows."""

from __future__ import annotations

import contextlib
import os
import shlex
import sys
from pathlib import Path
from types import ModuleType

from hivemind_worker.paths import Paths

APP_ID = "hivemind-worker"
RUN_KEY = r"Software\Microsoft\Windows\CurrentVersion\Run"
RUN_VALUE = "HiveMind Worker"


def data_root(paths: Paths | None) -> Path | None:
    """The folder given as --data-dir or HIVEMIND_HOME, when `paths` were made from one."""
    if paths is None:
        return None
    root = paths.data_dir.parent
    if paths.data_dir.name == "data" and paths.config_dir == root / "config":
        return root
    return None


def launch_command(paths: Paths | None = None) -> list[str]:
    """How to start the desktop app: the frozen binary, or this interpreter with -m.

    A data folder of its own (--data-dir, HIVEMIND_HOME) is passed on, or the app started at
    login would open the default folder: other settings, no login, nothing to resume.
    """
    root = data_root(paths)
    home = ["--data-dir", str(root)] if root is not None else []
    if getattr(sys, "frozen", False):
        return [sys.executable, *home, "gui", "--hidden"]
    return [sys.executable, "-m", "hivemind_worker", *home, "gui", "--hidden"]


class XdgAutostart:
    """~/.config/autostart/hivemind-worker.desktop (freedesktop Desktop Application Autostart)."""

    def __init__(self, config_home: Path | None = None, command: list[str] | None = None) -> None:
        base = config_home or Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config")
        self.path = base / "autostart" / f"{APP_ID}.desktop"
        self.command = command or launch_command()

    def is_enabled(self) -> bool:
        return self.path.is_file()

    def set_enabled(self, enabled: bool) -> None:
        if not enabled:
            self.path.unlink(missing_ok=True)
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        exec_line = " ".join(shlex.quote(part) for part in self.command)
        self.path.write_text(
            "[Desktop Entry]\n"
            "Type=Application\n"
            "Name=HiveMind Worker\n"
            "Comment=Donate spare compute to HiveMind\n"
            f"Exec={exec_line}\n"
            f"Icon={APP_ID}\n"
            "Terminal=false\n"
            "X-GNOME-Autostart-enabled=true\n",
            encoding="utf-8",
        )


class WindowsRunKey:
    """A value under HKCU\\...\\Run; `winreg` is injectable so the logic is testable anywhere."""

    def __init__(self, winreg: ModuleType | None = None, command: list[str] | None = None) -> None:
        if winreg is None:
            import winreg as real_winreg  # type: ignore[import-not-found,unused-ignore]

            winreg = real_winreg
        self.winreg = winreg
        self.command = command or launch_command()

    def _command_line(self) -> str:
        return " ".join(f'"{part}"' if " " in part else part for part in self.command)

    def is_enabled(self) -> bool:
        w = self.winreg
        try:
            with w.OpenKey(w.HKEY_CURRENT_USER, RUN_KEY, 0, w.KEY_READ) as key:
                w.QueryValueEx(key, RUN_VALUE)
                return True
        except FileNotFoundError:
            return False

    def set_enabled(self, enabled: bool) -> None:
        w = self.winreg
        with w.CreateKeyEx(w.HKEY_CURRENT_USER, RUN_KEY, 0, w.KEY_SET_VALUE) as key:
            if enabled:
                w.SetValueEx(key, RUN_VALUE, 0, w.REG_SZ, self._command_line())
            else:
                with contextlib.suppress(FileNotFoundError):
                    w.DeleteValue(key, RUN_VALUE)


def autostart(paths: Paths | None = None) -> XdgAutostart | WindowsRunKey:
    """The implementation for this platform, starting the app on the data folder of `paths`."""
    if sys.platform == "win32":
        return WindowsRunKey(command=launch_command(paths))
    return XdgAutostart(command=launch_command(paths))
