"""Freeze, thaw and throttle one task's whole process tree, for the process sandbox.

With a cgroup v2 folder of its own, a task is frozen through `cgroup.freeze` (atomic, and no
process can slip out by forking) and throttled through `cpu.max`. Without one, the tree is
frozen with SIGSTOP / SIGCONT, and throttled by a duty cycle of stop and continue, as BOINC
does: in each DUTY_PERIOD the tree runs for the allowed share and is stopped for the rest.

Called on the engine loop: each step is a handful of syscalls (signals, or one small write
to cgroupfs), so it runs inline; the duty cycle is a loop timer, not a thread.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Callable
from pathlib import Path

log = logging.getLogger(__name__)

DUTY_PERIOD = 0.5  # seconds; short enough for a smooth share, long enough to cost nothing
CPU_MAX_PERIOD_US = 100_000
MIN_SHARE = 0.01
# Not on Windows (no process sandbox there): the names exist only where the signals do.
_STOP = getattr(signal, "SIGSTOP", None)
_CONT = getattr(signal, "SIGCONT", None)


class TreeControl:
    """The freeze and CPU-share state of one task's process tree.

    `signal_tree(sig)` sends a signal to every process of the tree (the executor knows the
    tree); `cgroup`, when given, is the task's own cgroup v2 folder.
    """

    def __init__(
        self, signal_tree: Callable[[int], None], *, cgroup: Path | None = None, cpus: float = 1.0
    ) -> None:
        self._signal_tree = signal_tree
        self._cgroup = cgroup
        self._cpus = max(cpus, MIN_SHARE)
        self.frozen = False
        self.share = 1.0
        self._stopped = False  # whether the tree is stopped by signal right now
        self._duty: asyncio.TimerHandle | None = None
        self._running_phase = True
        self._closed = False

    @property
    def mechanism(self) -> str:
        return "cgroup" if self._cgroup is not None else "signals"

    # ---------------------------------------------------------------- freeze

    def freeze(self) -> None:
        self.frozen = True
        if not self._cgroup_write("cgroup.freeze", "1"):
            self._apply_signals()

    def thaw(self) -> None:
        self.frozen = False
        if not self._cgroup_write("cgroup.freeze", "0"):
            self._apply_signals()

    # ---------------------------------------------------------------- throttle

    def set_share(self, share: float) -> None:
        """Let the tree use `share` (0-1] of its CPU time; 1 lifts the throttle."""
        share = min(1.0, max(MIN_SHARE, share))
        if share == self.share:
            return
        self.share = share
        if self._cgroup is not None:
            quota = (
                "max"
                if share >= 1.0
                else str(max(int(share * self._cpus * CPU_MAX_PERIOD_US), 1000))
            )
            if self._cgroup_write("cpu.max", f"{quota} {CPU_MAX_PERIOD_US}"):
                return
        if share >= 1.0:
            self._stop_duty()
            self._running_phase = True
            self._apply_signals()
        elif self._duty is None:
            self._running_phase = True
            self._next_phase()

    def _next_phase(self) -> None:
        if self._closed or self.share >= 1.0:
            self._duty = None
            return
        self._running_phase = not self._running_phase if self._duty is not None else True
        self._apply_signals()
        seconds = DUTY_PERIOD * (self.share if self._running_phase else 1.0 - self.share)
        self._duty = asyncio.get_running_loop().call_later(seconds, self._next_phase)

    def _stop_duty(self) -> None:
        if self._duty is not None:
            self._duty.cancel()
            self._duty = None

    # ---------------------------------------------------------------- plumbing

    def _apply_signals(self) -> None:
        """Stop or continue the tree so that it runs exactly when neither frozen nor in the
        stopped part of a duty cycle."""
        if _STOP is None or _CONT is None or self._closed:
            return
        want_stopped = self.frozen or not self._running_phase
        if want_stopped != self._stopped:
            self._signal_tree(_STOP if want_stopped else _CONT)
            self._stopped = want_stopped
        elif want_stopped:
            # Processes forked since the last stop run until stopped too.
            self._signal_tree(_STOP)

    def _cgroup_write(self, name: str, value: str) -> bool:
        if self._cgroup is None:
            return False
        try:
            (self._cgroup / name).write_text(value)
        except OSError as exc:
            log.warning("cannot write %s to %s (%s); using signals instead", value, name, exc)
            self._cgroup = None
            return False
        return True

    def close(self) -> None:
        """The task has ended: stop the duty cycle (the tree is being killed anyway)."""
        self._stop_duty()
        self._closed = True
