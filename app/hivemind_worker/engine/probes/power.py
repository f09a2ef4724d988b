"""Power probe: on battery or plugged in, and the charge, from psutil.sensors_battery().

psutil reads /sys/class/power_supply on Linux and GetSystemPowerStatus on Windows. A test
can point the Linux reader at a sysfs tree of its own (`power_supply_path`); psutil's own
code then reads it, so the test runs the very path a laptop does.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

log = logging.getLogger(__name__)

_swap_lock = threading.Lock()


@dataclass(frozen=True)
class PowerReading:
    on_battery: bool | None = None
    percent: float | None = None


class PowerProbe:
    def __init__(self, power_supply_path: Path | None = None) -> None:
        self.power_supply_path = power_supply_path
        self._warned = False

    def read(self) -> PowerReading:
        try:
            with self._pointed():
                battery = psutil.sensors_battery()
        except Exception as exc:  # no sysfs folder, odd files, an OS without the call
            if not self._warned:
                log.info("cannot read the battery: %s", exc)
                self._warned = True
            return PowerReading()
        if battery is None:
            return PowerReading()  # no battery: never "on battery"
        plugged = battery.power_plugged
        return PowerReading(
            on_battery=None if plugged is None else not plugged, percent=float(battery.percent)
        )

    @contextlib.contextmanager
    def _pointed(self) -> Iterator[None]:
        if self.power_supply_path is None:
            yield
            return
        from psutil import _pslinux

        module: Any = _pslinux  # psutil marks the path Final; it reads it at call time

        with _swap_lock:
            previous = module.POWER_SUPPLY_PATH
            module.POWER_SUPPLY_PATH = str(self.power_supply_path)
            try:
                yield
            finally:
                module.POWER_SUPPLY_PATH = previous
