"""PyInstaller entry point: the hivemind-worker CLI, with a console for sub-commands on Windows."""

from __future__ import annotations

import sys


def _attach_parent_console() -> None:
    """A windowed Windows build has no console; borrow the parent's so `--version` etc. print.

    Only when started from a terminal with nothing redirected: a redirected stream
    (CI, `> out.txt`) already works, and a double-click has no parent console to attach.
    """
    if sys.platform != "win32" or not getattr(sys, "frozen", False):
        return
    if sys.stdout is not None and sys.stderr is not None:
        return
    import ctypes

    attach_parent_process = -1
    if not ctypes.windll.kernel32.AttachConsole(attach_parent_process):
        return
    if sys.stdout is None:
        sys.stdout = open("CONOUT$", "w", encoding="utf-8", errors="replace")  # noqa: SIM115
    if sys.stderr is None:
        sys.stderr = open("CONOUT$", "w", encoding="utf-8", errors="replace")  # noqa: SIM115
    if sys.stdin is None:
        sys.stdin = open("CONIN$", encoding="utf-8", errors="replace")  # noqa: SIM115


def _print_version() -> None:
    """`--version` alone, without the CLI's imports (asyncio, keyring, settings: ~0.1 s).

    Scripts and installers run it to check what is installed; it prints what the CLI's
    own `--version` prints, from the same package metadata.
    """
    from hivemind_worker import __version__

    print(f"hivemind-worker {__version__}")


if __name__ == "__main__":
    # The GUI (no sub-command) should not flash a console; every sub-command wants one.
    if len(sys.argv) > 1:
        _attach_parent_console()
    if sys.argv[1:] == ["--version"]:
        _print_version()
        sys.exit(0)
    from hivemind_worker.cli import main

    sys.exit(main())
