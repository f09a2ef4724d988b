"""A private X server (Xvfb) with a tray host (trayer), started and stopped with bounded waits."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path


class XServerError(RuntimeError):
    pass


def _free_display(start: int = 90) -> int:
    for number in range(start, start + 200):
        if (
            not Path(f"/tmp/.X11-unix/X{number}").exists()
            and not Path(f"/tmp/.X{number}-lock").exists()
        ):
            return number
    raise XServerError("no free X display number")


def _wait(predicate: object, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise XServerError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def _stop(process: subprocess.Popen[bytes] | None) -> None:
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


def missing_tools() -> list[str]:
    return [tool for tool in ("Xvfb", "trayer", "xprop") if shutil.which(tool) is None]


@contextlib.contextmanager
def xvfb_with_tray(log_dir: Path, size: str = "1280x800x24") -> Iterator[dict[str, str]]:
    """Yield an environment whose DISPLAY has a running system tray."""
    number = _free_display()
    display = f":{number}"
    env = {**os.environ, "DISPLAY": display}
    env.pop("WAYLAND_DISPLAY", None)
    log_dir.mkdir(parents=True, exist_ok=True)
    xvfb = tray = None
    try:
        with (log_dir / "xvfb.log").open("wb") as xlog:
            xvfb = subprocess.Popen(
                ["Xvfb", display, "-screen", "0", size, "-nolisten", "tcp"],
                stdout=xlog,
                stderr=subprocess.STDOUT,
            )

        def server_answers() -> bool:
            if xvfb is not None and xvfb.poll() is not None:
                raise XServerError(f"Xvfb exited; see {log_dir / 'xvfb.log'}")
            probe = subprocess.run(["xprop", "-root", "-len", "0"], env=env,
                                   capture_output=True, timeout=5, check=False)  # fmt: skip
            return probe.returncode == 0

        _wait(server_answers, 20, f"Xvfb on {display}")
        with (log_dir / "trayer.log").open("wb") as tlog:
            tray = subprocess.Popen(
                ["trayer", "--edge", "top", "--align", "right", "--widthtype", "request",
                 "--height", "32", "--transparent", "false", "--tint", "0x303030",
                 "--SetDockType", "true"],
                env=env, stdout=tlog, stderr=subprocess.STDOUT,
            )  # fmt: skip

        def tray_owned() -> bool:
            if tray is not None and tray.poll() is not None:
                raise XServerError(f"trayer exited; see {log_dir / 'trayer.log'}")
            # trayer's window is named "panel"; the app then waits for the tray selection.
            probe = subprocess.run(
                ["xprop", "-name", "panel", "WM_CLASS"], env=env,
                capture_output=True, text=True, timeout=5, check=False,
            )  # fmt: skip
            return probe.returncode == 0

        _wait(tray_owned, 20, "trayer to open its panel")
        yield env
    finally:
        _stop(tray)
        _stop(xvfb)
