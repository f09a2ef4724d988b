"""The weekly schedule a person sets for contributing ("mon-fri 18:00-08:00; sat-sun 00:00-24:00").

Shared by the settings' rules (which check what the person typed) and the engine's policy
(which decides with it), so that neither imports the other.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime, timedelta

WEEK_MINUTES = 7 * 24 * 60
DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_DAY_GROUPS = {
    "weekdays": DAYS[:5],
    "weekends": DAYS[5:],
    "daily": DAYS,
    "everyday": DAYS,
}


class ScheduleError(ValueError):
    """A schedule the worker cannot read; str() names the part that is wrong."""


@dataclass(frozen=True)
class Schedule:
    """Weekly windows in which contributing is allowed, as minutes since Monday 00:00.

    Text form: entries separated by ';', each days then time ranges, e.g.
    "mon-fri 18:00-08:00; sat-sun 00:00-24:00". A range that ends before it starts runs
    past midnight into the next day. Empty text: always.
    """

    windows: tuple[tuple[int, int], ...] = ()  # (start, end) with start < end <= 2 weeks
    text: str = ""

    @property
    def always(self) -> bool:
        return not self.windows

    @classmethod
    def parse(cls, text: str) -> Schedule:
        windows: list[tuple[int, int]] = []
        for entry in (part.strip() for part in text.split(";")):
            if not entry:
                continue
            match = re.fullmatch(r"([A-Za-z,\s-]+?)\s+([0-9:,\s-]+)", entry)
            if match is None:
                raise ScheduleError(
                    f"{entry!r} is not days followed by times, like 'mon-fri 18:00-08:00'"
                )
            days = _parse_days(match[1], entry)
            for span in match[2].split(","):
                start, end = _parse_span(span.strip(), entry)
                for day in days:
                    base = day * 24 * 60
                    windows.append((base + start, base + end))
        return cls(tuple(sorted(windows)), text.strip())

    def allows(self, when: datetime) -> bool:
        if self.always:
            return True
        minute = _week_minute(when)
        return any(
            start <= m < end for start, end in self.windows for m in (minute, minute + WEEK_MINUTES)
        )

    def next_change(self, when: datetime) -> datetime | None:
        """The next time allows() changes its answer; None if it never does."""
        if self.always:
            return None
        now = self.allows(when)
        minute = _week_minute(when)
        base = when.replace(second=0, microsecond=0)
        # Minute resolution over one week: at most 10,080 cheap checks, and only on a change.
        for step in range(1, WEEK_MINUTES + 1):
            m = (minute + step) % WEEK_MINUTES
            inside = any(s <= x < e for s, e in self.windows for x in (m, m + WEEK_MINUTES))
            if inside != now:
                return base + timedelta(minutes=step)
        return None


def _week_minute(when: datetime) -> int:
    return when.weekday() * 24 * 60 + when.hour * 60 + when.minute


def _day_index(word: str, entry: str) -> int:
    key = word.strip().lower()[:3]
    if len(word.strip()) < 3 or key not in DAYS:
        raise ScheduleError(
            f"unknown day {word.strip()!r} in {entry!r}; use mon, tue, wed, thu, fri, sat, sun"
        )
    return DAYS.index(key)


def _parse_days(text: str, entry: str) -> list[int]:
    days: list[int] = []
    for item in (part.strip() for part in text.split(",")):
        if not item:
            continue
        group = _DAY_GROUPS.get(item.lower().replace(" ", ""))
        if group is not None:
            days.extend(DAYS.index(d) for d in group)
        elif "-" in item:
            first, last = (_day_index(x, entry) for x in item.split("-", 1))
            days.extend((first + i) % 7 for i in range((last - first) % 7 + 1))
        else:
            days.append(_day_index(item, entry))
    if not days:
        raise ScheduleError(f"no days in {entry!r}")
    return sorted(set(days))


def _parse_time(text: str, entry: str) -> int:
    match = re.fullmatch(r"(\d{1,2}):(\d{2})", text.strip())
    if match is None or int(match[2]) > 59 or int(match[1]) * 60 + int(match[2]) > 24 * 60:
        raise ScheduleError(
            f"bad time {text.strip()!r} in {entry!r}; use HH:MM from 00:00 to 24:00"
        )
    return int(match[1]) * 60 + int(match[2])


def _parse_span(text: str, entry: str) -> tuple[int, int]:
    if text.count("-") != 1:
        raise ScheduleError(f"bad time range {text!r} in {entry!r}; use a range like 18:00-08:00")
    first, last = text.split("-")
    start, end = _parse_time(first, entry), _parse_time(last, entry)
    if start == end:
        raise ScheduleError(f"empty time range {text!r} in {entry!r}; for all day use 00:00-24:00")
    if start == 24 * 60:
        raise ScheduleError(f"time range {text!r} in {entry!r} starts at 24:00; start at 00:00")
    return (start, end) if end > start else (start, end + 24 * 60)
