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


if __name__ == "__main__":
    # The GUI (no sub-command) should not flash a console; every sub-command wants one.
    if len(sys.argv) > 1:
        _attach_parent_console()
    from hivemind_worker.cli import main

    sys.exit(main())
