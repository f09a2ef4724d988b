"""Probes for the when-to-contribute policy: input idle time, power, full screen, other load.

`DesktopProbes.observe()` gathers one Observation; it blocks (X11 and D-Bus round trips,
/proc reads), so the engine calls it through asyncio.to_thread, once a second. Every probe
degrades to None ("unknown") where it cannot tell, and never raises.
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

from hivemind_worker.engine.policy import Observation
from hivemind_worker.engine.probes.load import LoadProbe
from hivemind_worker.engine.probes.power import PowerProbe

log = logging.getLogger(__name__)
T = TypeVar("T")


class IdleSource(Protocol):
    def idle_seconds(self) -> float | None: ...

    def close(self) -> None: ...


class FullscreenSource(Protocol):
    def fullscreen(self) -> bool | None: ...

    def close(self) -> None: ...


class Probes(Protocol):
    """What the engine asks once a second (from a worker thread)."""

    def observe(self) -> Observation: ...

    def idle_seconds(self) -> float | None:
        """Input idle time alone: cheap, asked several times a second."""

    def close(self) -> None: ...


class NoProbes:
    """Sees nothing: the rules that need no probe (schedule, CPU time) still apply."""

    def observe(self) -> Observation:
        return Observation()

    def idle_seconds(self) -> float | None:
        return None

    def close(self) -> None:
        pass


class DesktopProbes:
    """The real probes of this platform; each part can be replaced (tests point them)."""

    def __init__(
        self,
        *,
        idle: IdleSource | None = None,
        fullscreen: FullscreenSource | None = None,
        power: PowerProbe | None = None,
        load: LoadProbe | None = None,
    ) -> None:
        self.idle = idle
        self.fullscreen = fullscreen
        self.power = power or PowerProbe()
        self.load = load or LoadProbe()

    @classmethod
    def for_this_desktop(
        cls,
        *,
        display: str | None = None,
        power_supply_path: Path | None = None,
        extra_cpu_seconds: Callable[[], float] | None = None,
    ) -> DesktopProbes:
        """Probes for where this process runs: Windows, an X11 display, or a Wayland
        session (D-Bus for idle time; full screen is unknown there)."""
        idle: IdleSource | None = None
        fullscreen: FullscreenSource | None = None
        if sys.platform == "win32":
            from hivemind_worker.engine.probes.windows import WindowsDesktop

            desktop = WindowsDesktop()
            idle = fullscreen = desktop
        else:
            from hivemind_worker.engine.probes.dbus_idle import DBusIdle
            from hivemind_worker.engine.probes.x11 import X11Desktop

            x11 = X11Desktop(display)
            wayland = display is None and bool(os.environ.get("WAYLAND_DISPLAY"))
            if x11.available():
                fullscreen = x11
            # Under Wayland, XWayland's idle counter sees only X clients' input: ask the
            # compositor over D-Bus first, and X11 only if that cannot tell.
            dbus = DBusIdle()
            if wayland:
                idle = _FirstAnswer([dbus, x11])
            elif x11.available():
                idle = _FirstAnswer([x11, dbus])
            else:
                idle = dbus
        return cls(
            idle=idle,
            fullscreen=fullscreen,
            power=PowerProbe(power_supply_path),
            load=LoadProbe(extra_cpu_seconds=extra_cpu_seconds),
        )

    def observe(self) -> Observation:
        power = self.power.read()
        return Observation(
            idle_seconds=_guarded(self.idle.idle_seconds) if self.idle else None,
            on_battery=power.on_battery,
            battery_percent=power.percent,
            other_cpu_percent=self.load.other_cpu_percent(),
            memory_available_percent=self.load.memory_available_percent(),
            fullscreen=_guarded(self.fullscreen.fullscreen) if self.fullscreen else None,
        )

    def idle_seconds(self) -> float | None:
        return _guarded(self.idle.idle_seconds) if self.idle else None

    def close(self) -> None:
        for part in (self.idle, self.fullscreen):
            if part is not None:
                _guarded(part.close)


class _FirstAnswer:
    """Idle time from the first source that knows it."""

    def __init__(self, sources: list[IdleSource]) -> None:
        self.sources = sources

    def idle_seconds(self) -> float | None:
        for source in self.sources:
            seconds = _guarded(source.idle_seconds)
            if seconds is not None:
                return seconds
        return None

    def close(self) -> None:
        for source in self.sources:
            _guarded(source.close)


def _guarded(probe: Callable[[], T]) -> T | None:
    try:
        return probe()
    except Exception:  # a probe bug must not stop the policy: unknown, and say so in the log
        log.exception("probe %r failed", probe)
        return None
