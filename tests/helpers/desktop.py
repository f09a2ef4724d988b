"""Desktop test helpers: Xvfb with a real EWMH window manager (openbox), a window to drive, and
a laptop's battery as a sysfs tree, and other programs keeping the CPU busy.

For the when-to-contribute tests: they move the pointer with xdotool and make a real window
full screen through the window manager, as a person's desktop would.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

from helpers import xserver

TOOLS = ("Xvfb", "openbox", "xdotool")


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


@contextlib.contextmanager
def xvfb(log_dir: Path, *, window_manager: bool = False) -> Iterator[str]:
    """Yield the DISPLAY of a fresh Xvfb (1280x800) that keeps its idle counter when xdotool
    disconnects (-noreset), with openbox managing it if asked."""
    with xserver.xvfb(log_dir, noreset=True) as display:
        wm = None
        try:
            if window_manager:
                env = {**os.environ, "DISPLAY": display}
                with (log_dir / "openbox.log").open("wb") as out:
                    wm = subprocess.Popen(
                        ["openbox", "--sm-disable"], env=env, stdout=out, stderr=subprocess.STDOUT
                    )
                xserver.wait_until(lambda: _has_ewmh(display), 20, "openbox to manage the screen")
            yield display
        finally:
            xserver.stop(wm)


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
        xserver.stop(client)


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


@contextlib.contextmanager
def cpu_burners(count: int) -> Iterator[list[int]]:
    """Processes spinning on the CPU outside this process tree (re-parented to init), like
    another program the person runs."""
    spin = "while True: pass"
    script = " ".join(
        f"{sys.executable} -c '{spin}' >/dev/null 2>&1 & echo $!;" for _ in range(count)
    )
    out = subprocess.run(["sh", "-c", script], capture_output=True, text=True, check=True)
    pids = [int(line) for line in out.stdout.split()]
    try:
        yield pids
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
