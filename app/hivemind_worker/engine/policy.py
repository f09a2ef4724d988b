"""When to contribute: observations + settings + time -> run, throttle or suspend, with a reason.

Pure: no probe, clock or engine in here. `Policy.evaluate` is called about once a second with
what the probes saw and the time; the only state it keeps is each rule's hysteresis, so that
a decision never flaps. A fake clock and fake observations test every rule.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from datetime import datetime
from enum import StrEnum
from typing import TYPE_CHECKING

from hivemind_worker.schedule import Schedule

if TYPE_CHECKING:
    from hivemind_worker.config import Settings

# A suspension that a plain fact lifts (plugged in, out of full screen) waits this long
# before the tasks thaw, so that a cable that wiggles or a video that flicks out of full
# screen for a moment does not freeze and thaw the tasks over and over.
SETTLE_SECONDS = 3.0
# Charge and memory rules release only a few points above where they fired.
PERCENT_BAND = 5.0


class Verdict(StrEnum):
    RUN = "run"
    THROTTLE = "throttle"
    SUSPEND = "suspend"


class Reason(StrEnum):
    """Why the decision is what it is; the GUI picks words and icons from these codes."""

    NONE = "none"
    OVERRIDE = "override"  # the person said "contribute anyway" for a while
    SCHEDULE = "schedule"
    ON_BATTERY = "on_battery"
    MEMORY_LOW = "memory_low"
    FULLSCREEN = "fullscreen"
    IN_USE = "in_use"
    IDLE_UNKNOWN = "idle_unknown"
    OTHER_LOAD = "other_load"
    CPU_LIMIT = "cpu_limit"


# In the order they win when several hold at once: the one a person can least change first.
_PRIORITY = (
    Reason.SCHEDULE,
    Reason.ON_BATTERY,
    Reason.MEMORY_LOW,
    Reason.FULLSCREEN,
    Reason.IN_USE,
    Reason.IDLE_UNKNOWN,
    Reason.OTHER_LOAD,
)

REASON_TEXT = {
    Reason.NONE: "contributing",
    Reason.OVERRIDE: "contributing anyway",
    Reason.SCHEDULE: "outside your schedule",
    Reason.ON_BATTERY: "on battery",
    Reason.MEMORY_LOW: "memory is low",
    Reason.FULLSCREEN: "a full-screen app is open",
    Reason.IN_USE: "you are using the computer",
    Reason.IDLE_UNKNOWN: "this desktop does not tell when you are away",
    Reason.OTHER_LOAD: "other programs are busy",
    Reason.CPU_LIMIT: "limited to part of the CPU time",
}


@dataclass(frozen=True)
class PolicySettings:
    """The person's rules; 0 turns a numeric rule off."""

    idle_only_minutes: float = 0.0
    suspend_on_battery: bool = True
    battery_below_percent: float = 0.0  # 0: suspend on battery at any charge
    other_cpu_percent: float = 25.0
    other_cpu_suspend_seconds: float = 10.0
    other_cpu_resume_seconds: float = 30.0
    suspend_fullscreen: bool = True
    schedule: Schedule = field(default_factory=Schedule)
    memory_low_percent: float = 10.0
    cpu_time_percent: float = 100.0  # "use at most X % of CPU time"
    give_back_minutes: float = 30.0  # 0: never give leases back

    @classmethod
    def from_settings(cls, settings: Settings) -> PolicySettings:
        return cls(
            idle_only_minutes=settings.idle_only_minutes,
            suspend_on_battery=settings.suspend_on_battery,
            battery_below_percent=settings.battery_below_percent,
            other_cpu_percent=settings.other_cpu_percent,
            other_cpu_suspend_seconds=settings.other_cpu_suspend_seconds,
            other_cpu_resume_seconds=settings.other_cpu_resume_seconds,
            suspend_fullscreen=settings.suspend_fullscreen,
            schedule=Schedule.parse(settings.schedule),
            memory_low_percent=settings.memory_low_percent,
            cpu_time_percent=settings.cpu_time_percent,
            give_back_minutes=settings.give_back_minutes,
        )


@dataclass(frozen=True)
class Observation:
    """What the probes saw; None is "unknown" and never fires a rule on its own."""

    idle_seconds: float | None = None
    on_battery: bool | None = None
    battery_percent: float | None = None
    other_cpu_percent: float | None = None
    memory_available_percent: float | None = None
    fullscreen: bool | None = None


@dataclass(frozen=True)
class Decision:
    """One decision: the engine publishes it whole (event, heartbeat, log line)."""

    verdict: Verdict
    reason: Reason
    since: float  # epoch seconds this verdict and reason have held
    resume_at: float | None = None  # epoch seconds it is expected to end, when known
    throttle_percent: float = 100.0  # share of CPU time tasks may use
    reasons: tuple[Reason, ...] = ()  # every suspending rule that holds, strongest first
    hint: str = ""  # how it ends, in words: "resumes when plugged in"

    @property
    def text(self) -> str:
        return REASON_TEXT[self.reason]

    def line(self) -> str:
        """One line for a log or a tooltip: "suspended: on battery — resumes when plugged in"."""
        if self.verdict is Verdict.RUN:
            return "running" + (f": {self.text}" if self.reason is Reason.OVERRIDE else "")
        if self.verdict is Verdict.THROTTLE:
            head = f"throttled to {self.throttle_percent:g} % of CPU time"
        else:
            head = f"suspended: {self.text}"
        return head + (f" — {self.hint}" if self.hint else "")

    def same_as(self, other: Decision | None) -> bool:
        """Equal in what a person sees (the verdict, reasons and throttle), not in timing."""
        return (
            other is not None
            and self.verdict is other.verdict
            and self.reason is other.reason
            and self.reasons == other.reasons
            and self.throttle_percent == other.throttle_percent
        )


@dataclass
class _Latch:
    """A rule's on/off state with a delay before it turns on and before it turns off."""

    on: bool = False
    pending_since: float | None = None  # when the raw condition last started to disagree

    def update(self, raw: bool | None, now: float, on_after: float, off_after: float) -> bool:
        if raw is None or raw == self.on:
            if raw is not None:
                self.pending_since = None
            return self.on  # unknown keeps the state, and keeps a streak from counting
        if self.pending_since is None:
            self.pending_since = now
        if now - self.pending_since >= (on_after if raw else off_after):
            self.on = raw
            self.pending_since = None
        return self.on

    def deadline(self, on_after: float, off_after: float) -> float | None:
        """When a streak under way would flip the state, if the condition holds till then."""
        if self.pending_since is None:
            return None
        return self.pending_since + (off_after if self.on else on_after)


class Policy:
    """The decision state machine; feed it one observation at a time with the time it was seen."""

    def __init__(self, settings: PolicySettings | None = None) -> None:
        self.settings = settings or PolicySettings()
        self._battery = _Latch()
        self._memory = _Latch()
        self._fullscreen = _Latch()
        self._other = _Latch()
        self._override_until: float | None = None
        self._last: Decision | None = None
        self._next_change: float | None = None  # see next_change()
        self._edge: tuple[Schedule, float, float | None] | None = None  # _schedule_edge

    def configure(self, settings: PolicySettings) -> None:
        """New rules; the hysteresis state carries over, so a change does not thaw by itself."""
        self.settings = settings

    def override(self, until: float | None) -> None:
        """Contribute anyway until `until` (epoch seconds), whatever the rules say; None ends it."""
        self._override_until = until

    @property
    def override_until(self) -> float | None:
        return self._override_until

    @property
    def last(self) -> Decision | None:
        return self._last

    def next_change(self) -> float | None:
        """The soonest time (epoch seconds) at which the last decision could change with no
        new observation: a schedule edge, an override's end, the end of the idle time the
        person asked for, a hysteresis streak running out. None: only a new observation can
        change it. The engine sleeps until then (or its own cadence), never polls faster."""
        return self._next_change

    def _schedule_edge(self, now: datetime) -> float | None:
        """The schedule's next edge (epoch seconds), computed once per edge: until then
        allows() keeps its answer, so the edge found earlier is still the next one."""
        schedule = self.settings.schedule
        if schedule.always:
            return None
        t = now.timestamp()
        cached = self._edge
        if cached is not None and cached[0] is schedule and cached[1] <= t < (cached[2] or 0):
            return cached[2]
        change = schedule.next_change(now)
        edge = change.timestamp() if change else None
        self._edge = (schedule, t, edge)
        return edge

    def evaluate(self, seen: Observation, now: datetime) -> Decision:
        t = now.timestamp()
        s = self.settings
        firing: list[Reason] = []
        resume_at: dict[Reason, float | None] = {}
        changes: list[float | None] = []

        if not s.schedule.allows(now):
            firing.append(Reason.SCHEDULE)
            resume_at[Reason.SCHEDULE] = self._schedule_edge(now)
        changes.append(self._schedule_edge(now))

        if s.suspend_on_battery:
            # Past the threshold it fires; it releases a band above it (or when plugged in).
            limit = s.battery_below_percent
            if self._battery.on:
                limit += PERCENT_BAND
            raw: bool | None = seen.on_battery
            if raw and s.battery_below_percent > 0:
                raw = None if seen.battery_percent is None else seen.battery_percent < limit
            if self._battery.update(raw, t, 0.0, SETTLE_SECONDS):
                firing.append(Reason.ON_BATTERY)
            changes.append(self._battery.deadline(0.0, SETTLE_SECONDS))
        else:
            self._battery = _Latch()

        if s.memory_low_percent > 0:
            limit = s.memory_low_percent + (PERCENT_BAND if self._memory.on else 0.0)
            available = seen.memory_available_percent
            raw = None if available is None else available < limit
            if self._memory.update(raw, t, 0.0, SETTLE_SECONDS):
                firing.append(Reason.MEMORY_LOW)
            changes.append(self._memory.deadline(0.0, SETTLE_SECONDS))
        else:
            self._memory = _Latch()

        if s.suspend_fullscreen:
            if self._fullscreen.update(seen.fullscreen, t, 0.0, SETTLE_SECONDS):
                firing.append(Reason.FULLSCREEN)
            changes.append(self._fullscreen.deadline(0.0, SETTLE_SECONDS))
        else:
            self._fullscreen = _Latch()

        if s.idle_only_minutes > 0:
            needed = s.idle_only_minutes * 60
            if seen.idle_seconds is None:
                firing.append(Reason.IDLE_UNKNOWN)
                resume_at[Reason.IDLE_UNKNOWN] = None
            elif seen.idle_seconds < needed:
                # The minutes of idleness asked for are the hysteresis: resume at once after.
                firing.append(Reason.IN_USE)
                resume_at[Reason.IN_USE] = t + needed - seen.idle_seconds
                changes.append(resume_at[Reason.IN_USE])  # input only pushes it later

        if s.other_cpu_percent > 0:
            other = seen.other_cpu_percent
            raw = None if other is None else other > s.other_cpu_percent
            if self._other.update(raw, t, s.other_cpu_suspend_seconds, s.other_cpu_resume_seconds):
                firing.append(Reason.OTHER_LOAD)
            changes.append(
                self._other.deadline(s.other_cpu_suspend_seconds, s.other_cpu_resume_seconds)
            )
        else:
            self._other = _Latch()

        overridden = self._override_until is not None and t < self._override_until
        if self._override_until is not None and not overridden:
            self._override_until = None
        changes.append(self._override_until)
        soon = [c for c in changes if c is not None]
        self._next_change = min(soon) if soon else None
        firing.sort(key=_PRIORITY.index)
        if firing and not overridden:
            reason = firing[0]
            ends = [resume_at.get(r) for r in firing]
            known = [e for e in ends if e is not None]
            until = max(known) if known and len(known) == len(ends) else None
            decision = Decision(
                Verdict.SUSPEND, reason, t, until, s.cpu_time_percent, tuple(firing),
                _hint(reason, s, until),
            )  # fmt: skip
        elif s.cpu_time_percent < 100:
            decision = Decision(
                Verdict.THROTTLE,
                Reason.OVERRIDE if overridden and firing else Reason.CPU_LIMIT,
                t,
                throttle_percent=s.cpu_time_percent,
                hint="your setting" if not overridden else _override_hint(self._override_until),
            )
        elif overridden and firing:
            decision = Decision(
                Verdict.RUN, Reason.OVERRIDE, t, self._override_until,
                hint=_override_hint(self._override_until),
            )  # fmt: skip
        else:
            decision = Decision(Verdict.RUN, Reason.NONE, t)
        if decision.same_as(self._last):
            assert self._last is not None
            decision = replace(decision, since=self._last.since)
        self._last = decision
        return decision


def _clock(epoch: float) -> str:
    return datetime.fromtimestamp(epoch).strftime("%H:%M")


def _override_hint(until: float | None) -> str:
    return f"until {_clock(until)}" if until is not None else ""


def _hint(reason: Reason, s: PolicySettings, until: float | None) -> str:
    if reason is Reason.SCHEDULE:
        return f"resumes at {_clock(until)}" if until is not None else "resumes with your schedule"
    if reason is Reason.ON_BATTERY:
        if s.battery_below_percent > 0:
            return "resumes when plugged in or charged"
        return "resumes when plugged in"
    if reason is Reason.MEMORY_LOW:
        return "resumes when memory is free again"
    if reason is Reason.FULLSCREEN:
        return "resumes when you leave full screen"
    if reason is Reason.IN_USE:
        minutes = f"{s.idle_only_minutes:g} minute" + ("" if s.idle_only_minutes == 1 else "s")
        return f"resumes after {minutes} without input"
    if reason is Reason.IDLE_UNKNOWN:
        return "turn off 'only when idle' to contribute"
    if reason is Reason.OTHER_LOAD:
        return f"resumes when they are quiet for {s.other_cpu_resume_seconds:g} s"
    return ""
