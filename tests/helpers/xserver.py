"""A private X server (Xvfb) with a tray host (trayer), started and stopped with bounded waits."""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path


class XServerError(RuntimeError):
    pass


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll `predicate` every 50 ms; XServerError naming `what` after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise XServerError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.05)


def stop(process: subprocess.Popen[bytes] | None) -> None:
    """Terminate a helper process, killing it if it does not end within 5 s."""
    if process is None or process.poll() is not None:
        return
    process.terminate()
    try:
        process.wait(5)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait(5)


@contextlib.contextmanager
def xvfb(log_dir: Path, *, size: str = "1280x800x24", noreset: bool = False) -> Iterator[str]:
    """Yield the DISPLAY (":N") of a fresh Xvfb, stopped on exit.

    -displayfd: Xvfb picks a free display itself and writes its number once it is ready, so
    parallel test runs never race for a number. `noreset`: by default the server resets (and
    its idle counter with it) each time its last client disconnects, as xdotool does after
    every command.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    server = None
    try:
        read_fd, write_fd = os.pipe()
        with (log_dir / "xvfb.log").open("wb") as xlog:
            server = subprocess.Popen(
                ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", size, "-nolisten", "tcp",
                 *(["-noreset"] if noreset else [])],
                stdout=xlog, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            )  # fmt: skip
        os.close(write_fd)
        number = b""
        deadline = time.monotonic() + 20
        while not number.endswith(b"\n"):
            ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(read_fd, 16) if ready else b""
            if not chunk:
                raise XServerError(f"Xvfb did not start; see {log_dir / 'xvfb.log'}")
            number += chunk
        os.close(read_fd)
        yield f":{int(number)}"
    finally:
        stop(server)


def missing_tools() -> list[str]:
    return [tool for tool in ("Xvfb", "trayer", "xprop") if shutil.which(tool) is None]


@contextlib.contextmanager
def xvfb_with_tray(log_dir: Path, size: str = "1280x800x24") -> Iterator[dict[str, str]]:
    """Yield an environment whose DISPLAY has a running system tray."""
    with xvfb(log_dir, size=size) as display:
        env = {**os.environ, "DISPLAY": display}
        env.pop("WAYLAND_DISPLAY", None)
        tray = None
        try:
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

            wait_until(tray_owned, 20, "trayer to open its panel")
            yield env
        finally:
            stop(tray)
