"""Desktop test helpers: Xvfb with a real EWMH window manager (openbox), a window to drive, and
a laptop's battery as a sysfs tree.

For the when-to-contribute tests: they move the pointer with xdotool and make a real window
full screen through the window manager, as a person's desktop would.
"""

from __future__ import annotations

import contextlib
import os
import select
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

TOOLS = ("Xvfb", "openbox", "xdotool")


class DesktopError(RuntimeError):
    pass


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


def _wait(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise DesktopError(f"timed out after {timeout:.0f} s waiting for {what}")
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


@contextlib.contextmanager
def xvfb(log_dir: Path, *, window_manager: bool = False) -> Iterator[str]:
    """Yield the DISPLAY of a fresh Xvfb (1280x800), with openbox managing it if asked.

    -noreset: by default the server resets (and its idle counter with it) each time its
    last client disconnects, as xdotool does after every command.
    """
    log_dir.mkdir(parents=True, exist_ok=True)
    server = wm = None
    try:
        read_fd, write_fd = os.pipe()
        with (log_dir / "xvfb.log").open("wb") as out:
            server = subprocess.Popen(
                ["Xvfb", "-displayfd", str(write_fd), "-screen", "0", "1280x800x24",
                 "-nolisten", "tcp", "-noreset"],
                stdout=out, stderr=subprocess.STDOUT, pass_fds=(write_fd,),
            )  # fmt: skip
        os.close(write_fd)
        number = b""
        deadline = time.monotonic() + 20
        while not number.endswith(b"\n"):
            ready, _, _ = select.select([read_fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(read_fd, 16) if ready else b""
            if not chunk:
                raise DesktopError(f"Xvfb did not start; see {log_dir / 'xvfb.log'}")
            number += chunk
        os.close(read_fd)
        display = f":{int(number)}"
        if window_manager:
            env = {**os.environ, "DISPLAY": display}
            with (log_dir / "openbox.log").open("wb") as out:
                wm = subprocess.Popen(
                    ["openbox", "--sm-disable"], env=env, stdout=out, stderr=subprocess.STDOUT
                )
            _wait(lambda: _has_ewmh(display), 20, "openbox to manage the screen")
        yield display
    finally:
        _stop(wm)
        _stop(server)


def _has_ewmh(display: str) -> bool:
    from Xlib import X
    from Xlib import display as xdisplay

    connection = xdisplay.Display(display)
    try:
        root = connection.screen().root
        atom = connection.intern_atom("_NET_SUPPORTING_WM_CHECK")
        return root.get_full_property(atom, X.AnyPropertyType) is not None
    finally:
        connection.close()


def move_pointer(display: str, x: int, y: int) -> None:
    subprocess.run(
        ["xdotool", "mousemove", str(x), str(y)],
        env={**os.environ, "DISPLAY": display}, check=True, timeout=10,
    )  # fmt: skip


# A plain X client: one top-level window, mapped, serving events until killed.
_WINDOW_CLIENT = textwrap.dedent(
    """
    import sys
    from Xlib import X, display
    d = display.Display(sys.argv[1])
    screen = d.screen()
    w = screen.root.create_window(100, 100, 400, 300, 0, screen.root_depth,
                                  background_pixel=screen.white_pixel,
                                  event_mask=X.StructureNotifyMask)
    w.set_wm_name(sys.argv[2])
    w.map()
    d.sync()
    print(w.id, flush=True)
    while True:
        d.next_event()
    """
)


@contextlib.contextmanager
def app_window(display: str, title: str) -> Iterator[int]:
    """A real top-level window of another process; yields its X window id."""
    client = subprocess.Popen(
        [sys.executable, "-c", _WINDOW_CLIENT, display, title], stdout=subprocess.PIPE
    )
    try:
        assert client.stdout is not None
        window = int(client.stdout.readline())
        yield window
    finally:
        _stop(client)


def set_fullscreen(display: str, window: int, on: bool) -> None:
    """Ask the window manager to put the window in or out of full screen and focus it, as a
    player's F11 does: an EWMH client message to the root window (what wmctrl sends)."""
    from Xlib import X
    from Xlib import display as xdisplay
    from Xlib.protocol import event

    connection = xdisplay.Display(display)
    try:
        root = connection.screen().root
        target = connection.create_resource_object("window", window)
        mask = X.SubstructureRedirectMask | X.SubstructureNotifyMask
        active = event.ClientMessage(
            window=target, client_type=connection.intern_atom("_NET_ACTIVE_WINDOW"),
            data=(32, [2, X.CurrentTime, 0, 0, 0]),
        )  # fmt: skip
        root.send_event(active, event_mask=mask)
        state = event.ClientMessage(
            window=target, client_type=connection.intern_atom("_NET_WM_STATE"),
            data=(32, [1 if on else 0, connection.intern_atom("_NET_WM_STATE_FULLSCREEN"),
                       0, 2, 0]),
        )  # fmt: skip
        root.send_event(state, event_mask=mask)
        connection.sync()
    finally:
        connection.close()


def write_battery(root: Path, *, plugged: bool, percent: int) -> None:
    """A /sys/class/power_supply tree as a laptop's kernel lays it out."""
    battery, adapter = root / "BAT0", root / "AC"
    battery.mkdir(parents=True, exist_ok=True)
    adapter.mkdir(parents=True, exist_ok=True)
    (battery / "type").write_text("Battery\n")
    (battery / "capacity").write_text(f"{percent}\n")
    (battery / "status").write_text("Charging\n" if plugged else "Discharging\n")
    (adapter / "type").write_text("Mains\n")
    (adapter / "online").write_text("1\n" if plugged else "0\n")
