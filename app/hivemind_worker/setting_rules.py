"""What a setting accepts beyond its type: ranges, patterns, choices; each names what it allows."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hivemind_worker.schedule import Schedule, ScheduleError


def number_text(x: float) -> str:
    """A bound as a person reads it: 8 not 8.0, 15.5 for 15.56."""
    if float(x).is_integer():
        return str(int(x))
    return f"{math.floor(x * 10) / 10:g}"  # round down so the shown maximum is itself allowed


class Rule:
    """What one setting accepts beyond its type."""

    def allowed(self) -> str:
        """The text that follows "expected" in an error message."""
        raise NotImplementedError

    def check(self, value: Any) -> Any:
        """Return the value, normalized; raise ValueError if it is not allowed."""
        raise NotImplementedError


@dataclass(frozen=True)
class Range(Rule):
    low: float
    high: float | Callable[[], float]
    integer: bool = False
    low_open: bool = False
    note: str = ""

    def _high(self) -> float:
        return self.high() if callable(self.high) else self.high

    def allowed(self) -> str:
        kind = "a whole number" if self.integer else "a number"
        low, high = number_text(self.low), number_text(self._high())
        text = (
            f"{kind} greater than {low} and at most {high}"
            if self.low_open
            else f"{kind} from {low} to {high}"
        )
        return f"{text} ({self.note})" if self.note else text

    def check(self, value: Any) -> Any:
        above_low = value > self.low if self.low_open else value >= self.low
        if not (above_low and value <= self._high()):  # also rejects NaN
            raise ValueError(value)
        return value


@dataclass(frozen=True)
class Pattern(Rule):
    pattern: str
    text: str

    def allowed(self) -> str:
        return self.text

    def check(self, value: Any) -> Any:
        if not re.fullmatch(self.pattern, value):
            raise ValueError(value)
        return value


@dataclass(frozen=True)
class MaxLength(Rule):
    limit: int

    def allowed(self) -> str:
        return f"text of at most {self.limit} characters"

    def check(self, value: Any) -> Any:
        if len(value) > self.limit:
            raise ValueError(value)
        return value


@dataclass(frozen=True)
class OptionalFile(Rule):
    def allowed(self) -> str:
        return "empty, or the path of an existing file"

    def check(self, value: Any) -> Any:
        if value and not Path(value).expanduser().is_file():
            raise ValueError(value)
        return str(Path(value).expanduser().absolute()) if value else ""


@dataclass(frozen=True)
class Choice(Rule):
    choices: tuple[str, ...]

    def allowed(self) -> str:
        return "one of " + ", ".join(self.choices)

    def check(self, value: Any) -> Any:
        value = value.strip().lower()
        if value not in self.choices:
            raise ValueError(value)
        return value


ADDRESS_PATTERN = r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):(\d{1,5})"


@dataclass(frozen=True)
class Address(Rule):
    def allowed(self) -> str:
        return "host:port with a port from 1 to 65535 (IPv6 as [::1]:port)"

    def check(self, value: Any) -> Any:
        match = re.fullmatch(ADDRESS_PATTERN, value)
        if match is None or not 1 <= int(match[2]) <= 65535:
            raise ValueError(value)
        return value


class RuleError(ValueError):
    """A value a rule refuses, with str() naming the part that is wrong."""


@dataclass(frozen=True)
class WeeklySchedule(Rule):
    """Days and time ranges (schedule.py's Schedule); normalized to trimmed text."""

    def allowed(self) -> str:
        return "days and times like 'mon-fri 18:00-08:00; sat-sun 00:00-24:00', or empty"

    def check(self, value: Any) -> Any:
        try:
            return Schedule.parse(value).text
        except ScheduleError as exc:
            raise RuleError(str(exc)) from None
