"""The when-to-contribute policy: each rule, its hysteresis and their combination, fake clock."""

from __future__ import annotations

from dataclasses import replace
from datetime import datetime, timedelta

import pytest

from hivemind_worker.engine.policy import (
    Decision,
    Observation,
    Policy,
    PolicySettings,
    Reason,
    Verdict,
)
from hivemind_worker.schedule import Schedule, ScheduleError

MONDAY_NOON = datetime(2026, 3, 2, 12, 0, 0)  # a Monday
QUIET = Observation(
    idle_seconds=3600.0,
    on_battery=False,
    battery_percent=100.0,
    other_cpu_percent=0.0,
    memory_available_percent=80.0,
    fullscreen=False,
)


class Clock:
    """A fake clock the test moves by hand."""

    def __init__(self, start: datetime = MONDAY_NOON) -> None:
        self.now = start

    def tick(self, seconds: float = 1.0) -> datetime:
        self.now += timedelta(seconds=seconds)
        return self.now


def run_for(policy: Policy, clock: Clock, seen: Observation, seconds: int) -> list[Decision]:
    """Evaluate once a second for `seconds` seconds, as the engine does."""
    return [policy.evaluate(seen, clock.tick()) for _ in range(seconds)]


def test_all_quiet_runs() -> None:
    decision = Policy().evaluate(QUIET, MONDAY_NOON)
    assert decision.verdict is Verdict.RUN
    assert decision.reason is Reason.NONE
    assert decision.line() == "running"


def test_unknown_everything_runs_with_default_rules() -> None:
    assert Policy().evaluate(Observation(), MONDAY_NOON).verdict is Verdict.RUN


# ---------------------------------------------------------------- battery


def test_battery_suspends_at_once_and_resumes_after_settling() -> None:
    clock = Clock()
    policy = Policy()
    decision = policy.evaluate(replace(QUIET, on_battery=True), clock.now)
    assert decision.verdict is Verdict.SUSPEND
    assert decision.reason is Reason.ON_BATTERY
    assert decision.line() == "suspended: on battery — resumes when plugged in"
    plugged = run_for(policy, clock, QUIET, 5)
    # Still suspended for the settle time, then running.
    assert [d.verdict for d in plugged[:2]] == [Verdict.SUSPEND, Verdict.SUSPEND]
    assert plugged[-1].verdict is Verdict.RUN


def test_battery_cable_wiggle_does_not_flap() -> None:
    clock = Clock()
    policy = Policy()
    policy.evaluate(replace(QUIET, on_battery=True), clock.now)
    verdicts = []
    for i in range(20):  # plugged for 1 s, unplugged for 1 s, ...
        seen = replace(QUIET, on_battery=bool(i % 2))
        verdicts.append(policy.evaluate(seen, clock.tick()).verdict)
    assert set(verdicts) == {Verdict.SUSPEND}


def test_battery_rule_off() -> None:
    policy = Policy(PolicySettings(suspend_on_battery=False))
    assert policy.evaluate(replace(QUIET, on_battery=True), MONDAY_NOON).verdict is Verdict.RUN


def test_battery_below_charge_threshold_with_band() -> None:
    clock = Clock()
    policy = Policy(PolicySettings(battery_below_percent=40))
    on_battery = replace(QUIET, on_battery=True)
    assert policy.evaluate(replace(on_battery, battery_percent=60), clock.now).verdict is (
        Verdict.RUN
    )
    assert policy.evaluate(replace(on_battery, battery_percent=39), clock.tick()).verdict is (
        Verdict.SUSPEND
    )
    # 42 % is above the threshold but inside the band: it stays suspended.
    assert run_for(policy, clock, replace(on_battery, battery_percent=42), 10)[-1].verdict is (
        Verdict.SUSPEND
    )
    assert run_for(policy, clock, replace(on_battery, battery_percent=46), 5)[-1].verdict is (
        Verdict.RUN
    )


def test_unknown_battery_never_suspends() -> None:
    seen = replace(QUIET, on_battery=None, battery_percent=None)
    assert Policy().evaluate(seen, MONDAY_NOON).verdict is Verdict.RUN


# ---------------------------------------------------------------- idle


def test_idle_only_suspends_while_in_use_and_resumes_at_once() -> None:
    clock = Clock()
    policy = Policy(PolicySettings(idle_only_minutes=5))
    decision = policy.evaluate(replace(QUIET, idle_seconds=30), clock.now)
    assert decision.verdict is Verdict.SUSPEND
    assert decision.reason is Reason.IN_USE
    assert decision.hint == "resumes after 5 minutes without input"
    # Expected to resume when the 5 minutes are up: 270 s from now.
    assert decision.resume_at == pytest.approx(clock.now.timestamp() + 270)
    decision = policy.evaluate(replace(QUIET, idle_seconds=300), clock.tick())
    assert decision.verdict is Verdict.RUN


def test_idle_only_with_unknown_idle_time_suspends_and_says_why() -> None:
    policy = Policy(PolicySettings(idle_only_minutes=5))
    decision = policy.evaluate(replace(QUIET, idle_seconds=None), MONDAY_NOON)
    assert decision.verdict is Verdict.SUSPEND
    assert decision.reason is Reason.IDLE_UNKNOWN


def test_idle_rule_off_ignores_input() -> None:
    assert Policy().evaluate(replace(QUIET, idle_seconds=0), MONDAY_NOON).verdict is Verdict.RUN


# ---------------------------------------------------------------- other load


def test_other_load_needs_a_streak_to_suspend_and_another_to_resume() -> None:
    clock = Clock()
    rules = PolicySettings(other_cpu_suspend_seconds=10, other_cpu_resume_seconds=30)
    policy = Policy(rules)
    busy = replace(QUIET, other_cpu_percent=80)
    verdicts = [d.verdict for d in run_for(policy, clock, busy, 12)]
    assert verdicts[:9] == [Verdict.RUN] * 9
    assert verdicts[-1] is Verdict.SUSPEND
    suspended = policy.last
    assert suspended is not None and suspended.reason is Reason.OTHER_LOAD
    verdicts = [d.verdict for d in run_for(policy, clock, QUIET, 32)]
    assert verdicts[:29] == [Verdict.SUSPEND] * 29
    assert verdicts[-1] is Verdict.RUN


def test_other_load_spikes_shorter_than_the_streak_never_suspend() -> None:
    clock = Clock()
    policy = Policy(PolicySettings(other_cpu_suspend_seconds=5))
    for _ in range(10):  # 4 s busy, 1 s quiet, over and over
        for seen in [replace(QUIET, other_cpu_percent=90)] * 4 + [QUIET]:
            assert policy.evaluate(seen, clock.tick()).verdict is Verdict.RUN


def test_other_load_at_the_threshold_is_not_above_it() -> None:
    clock = Clock()
    policy = Policy(PolicySettings(other_cpu_suspend_seconds=1))
    decisions = run_for(policy, clock, replace(QUIET, other_cpu_percent=25), 5)
    assert decisions[-1].verdict is Verdict.RUN


def test_unknown_load_holds_the_state() -> None:
    clock = Clock()
    policy = Policy(PolicySettings(other_cpu_suspend_seconds=2, other_cpu_resume_seconds=2))
    run_for(policy, clock, replace(QUIET, other_cpu_percent=90), 3)
    assert policy.last is not None and policy.last.verdict is Verdict.SUSPEND
    unknown = run_for(policy, clock, replace(QUIET, other_cpu_percent=None), 10)
    assert {d.verdict for d in unknown} == {Verdict.SUSPEND}


def test_other_load_rule_off() -> None:
    clock = Clock()
    policy = Policy(PolicySettings(other_cpu_percent=0))
    assert run_for(policy, clock, replace(QUIET, other_cpu_percent=100), 60)[-1].verdict is (
        Verdict.RUN
    )


# ---------------------------------------------------------------- full screen


def test_fullscreen_suspends_at_once_and_resumes_after_settling() -> None:
    clock = Clock()
    policy = Policy()
    decision = policy.evaluate(replace(QUIET, fullscreen=True), clock.now)
    assert (decision.verdict, decision.reason) == (Verdict.SUSPEND, Reason.FULLSCREEN)
    after = run_for(policy, clock, QUIET, 4)
    assert after[0].verdict is Verdict.SUSPEND
    assert after[-1].verdict is Verdict.RUN


def test_fullscreen_rule_off() -> None:
    policy = Policy(PolicySettings(suspend_fullscreen=False))
    assert policy.evaluate(replace(QUIET, fullscreen=True), MONDAY_NOON).verdict is Verdict.RUN


# ---------------------------------------------------------------- memory


def test_memory_low_with_band() -> None:
    clock = Clock()
    policy = Policy(PolicySettings(memory_low_percent=10))
    assert policy.evaluate(replace(QUIET, memory_available_percent=8), clock.now).reason is (
        Reason.MEMORY_LOW
    )
    assert run_for(policy, clock, replace(QUIET, memory_available_percent=12), 10)[-1].verdict is (
        Verdict.SUSPEND
    )
    assert run_for(policy, clock, replace(QUIET, memory_available_percent=20), 4)[-1].verdict is (
        Verdict.RUN
    )


def test_memory_rule_off() -> None:
    policy = Policy(PolicySettings(memory_low_percent=0))
    assert policy.evaluate(replace(QUIET, memory_available_percent=1), MONDAY_NOON).verdict is (
        Verdict.RUN
    )


# ---------------------------------------------------------------- schedule


def test_schedule_weekday_evenings_and_weekends() -> None:
    schedule = Schedule.parse("mon-fri 18:00-08:00; sat-sun 00:00-24:00")
    assert not schedule.allows(datetime(2026, 3, 2, 12, 0))  # Monday noon
    assert schedule.allows(datetime(2026, 3, 2, 18, 0))  # Monday 18:00
    assert schedule.allows(datetime(2026, 3, 3, 7, 59))  # Tuesday early: Monday's night
    assert not schedule.allows(datetime(2026, 3, 3, 8, 0))
    assert schedule.allows(datetime(2026, 3, 7, 13, 0))  # Saturday
    # Monday 03:00: Sunday's day ended at midnight and Monday's evening has not begun.
    assert not schedule.allows(datetime(2026, 3, 2, 3, 0))
    assert schedule.allows(datetime(2026, 3, 7, 7, 0))  # Saturday 07:00: Friday's night


def test_schedule_wraps_from_sunday_into_monday() -> None:
    schedule = Schedule.parse("sun 22:00-02:00")
    assert schedule.allows(datetime(2026, 3, 8, 23, 0))  # Sunday 23:00
    assert schedule.allows(datetime(2026, 3, 9, 1, 0))  # Monday 01:00
    assert not schedule.allows(datetime(2026, 3, 9, 2, 0))


def test_schedule_words_and_lists() -> None:
    schedule = Schedule.parse("weekdays 12:00-13:00, 20:00-22:00; sat,sun 09:00-17:00")
    assert schedule.allows(datetime(2026, 3, 4, 12, 30))  # Wednesday lunch
    assert schedule.allows(datetime(2026, 3, 4, 21, 0))
    assert not schedule.allows(datetime(2026, 3, 4, 15, 0))
    assert schedule.allows(datetime(2026, 3, 8, 10, 0))  # Sunday


def test_empty_schedule_is_always() -> None:
    assert Schedule.parse("  ").always
    assert Schedule.parse("").allows(MONDAY_NOON)


@pytest.mark.parametrize(
    ("text", "named"),
    [
        ("mon-fry 18:00-08:00", "'fry'"),
        ("mon-fri 25:00-08:00", "'25:00'"),
        ("mon-fri 18:00", "'18:00'"),
        ("mon-fri 18:00-18:00", "empty time range"),
        ("18:00-08:00", "not days followed by times"),
        ("mon 12:61-13:00", "'12:61'"),
        ("mon 24:00-02:00", "starts at 24:00"),
    ],
)
def test_schedule_errors_name_the_bad_part(text: str, named: str) -> None:
    with pytest.raises(ScheduleError) as caught:
        Schedule.parse(text)
    assert named in str(caught.value)


def test_outside_schedule_suspends_until_the_window_opens() -> None:
    rules = PolicySettings(schedule=Schedule.parse("mon-fri 18:00-08:00"))
    decision = Policy(rules).evaluate(QUIET, MONDAY_NOON)
    assert (decision.verdict, decision.reason) == (Verdict.SUSPEND, Reason.SCHEDULE)
    assert decision.resume_at == datetime(2026, 3, 2, 18, 0).timestamp()
    assert decision.hint == "resumes at 18:00"
    assert Policy(rules).evaluate(QUIET, datetime(2026, 3, 2, 19, 0)).verdict is Verdict.RUN


# ---------------------------------------------------------------- throttle and combination


def test_use_at_most_throttles_when_nothing_suspends() -> None:
    policy = Policy(PolicySettings(cpu_time_percent=40))
    decision = policy.evaluate(QUIET, MONDAY_NOON)
    assert decision.verdict is Verdict.THROTTLE
    assert decision.throttle_percent == 40
    assert decision.line() == "throttled to 40 % of CPU time — your setting"
    suspended = policy.evaluate(replace(QUIET, on_battery=True), MONDAY_NOON)
    assert suspended.verdict is Verdict.SUSPEND


def test_strongest_reason_wins_and_all_are_listed() -> None:
    rules = PolicySettings(idle_only_minutes=1, schedule=Schedule.parse("mon-fri 18:00-08:00"))
    seen = replace(QUIET, on_battery=True, fullscreen=True, idle_seconds=0)
    decision = Policy(rules).evaluate(seen, MONDAY_NOON)
    assert decision.reason is Reason.SCHEDULE
    assert decision.reasons == (
        Reason.SCHEDULE,
        Reason.ON_BATTERY,
        Reason.FULLSCREEN,
        Reason.IN_USE,
    )
    # The battery's end is unknown, so the whole suspension's end is too.
    assert decision.resume_at is None


def test_resume_needs_every_rule_to_clear() -> None:
    clock = Clock()
    policy = Policy()
    policy.evaluate(replace(QUIET, on_battery=True, fullscreen=True), clock.now)
    after_plug = run_for(policy, clock, replace(QUIET, fullscreen=True), 10)
    assert after_plug[-1].reason is Reason.FULLSCREEN
    assert run_for(policy, clock, QUIET, 4)[-1].verdict is Verdict.RUN


def test_since_stays_while_the_decision_holds() -> None:
    clock = Clock()
    policy = Policy()
    first = policy.evaluate(replace(QUIET, on_battery=True), clock.now)
    later = run_for(policy, clock, replace(QUIET, on_battery=True), 30)[-1]
    assert later.since == first.since == MONDAY_NOON.timestamp()
    assert later.same_as(first)


def test_override_contributes_anyway_until_it_ends() -> None:
    clock = Clock()
    policy = Policy()
    on_battery = replace(QUIET, on_battery=True)
    policy.override((clock.now + timedelta(hours=1)).timestamp())
    decision = policy.evaluate(on_battery, clock.now)
    assert (decision.verdict, decision.reason) == (Verdict.RUN, Reason.OVERRIDE)
    assert decision.line() == "running: contributing anyway"
    clock.tick(3600)
    assert policy.evaluate(on_battery, clock.now).reason is Reason.ON_BATTERY


def test_changed_rules_apply_at_the_next_evaluation() -> None:
    policy = Policy()
    seen = replace(QUIET, fullscreen=True)
    assert policy.evaluate(seen, MONDAY_NOON).verdict is Verdict.SUSPEND
    policy.configure(PolicySettings(suspend_fullscreen=False))
    assert policy.evaluate(seen, MONDAY_NOON + timedelta(seconds=1)).verdict is Verdict.RUN


# ---------------------------------------------------------------- when to look again


def sparse(policy: Policy, clock: Clock, seen: Observation, until: float) -> list[Decision]:
    """Evaluate only when next_change() says a decision could change (or at `until`), as
    the engine does with no task running: the decisions must match looking every second."""
    decisions = []
    while clock.now.timestamp() < until:
        decisions.append(policy.evaluate(seen, clock.now))
        change = policy.next_change()
        step = until - clock.now.timestamp() if change is None else change - clock.now.timestamp()
        clock.tick(max(0.001, min(step, until - clock.now.timestamp())))
    return decisions


def test_nothing_pending_needs_no_look_until_something_is_seen() -> None:
    policy = Policy()
    policy.evaluate(QUIET, MONDAY_NOON)
    assert policy.next_change() is None


def test_in_use_looks_again_when_the_idle_time_asked_for_is_over() -> None:
    clock = Clock()
    policy = Policy(PolicySettings(idle_only_minutes=5))
    decision = policy.evaluate(replace(QUIET, idle_seconds=60.0), clock.now)
    assert decision.reason is Reason.IN_USE
    assert policy.next_change() == clock.now.timestamp() + 240
    # Nobody touches anything: the next look, at that moment, resumes.
    later = clock.tick(240)
    assert policy.evaluate(replace(QUIET, idle_seconds=300.0), later).verdict is Verdict.RUN


def test_a_streak_under_way_is_looked_at_when_it_would_flip_and_keeps_its_length() -> None:
    clock = Clock()
    policy = Policy(PolicySettings(other_cpu_suspend_seconds=10, other_cpu_resume_seconds=30))
    busy = replace(QUIET, other_cpu_percent=90.0)
    start = clock.now.timestamp()
    policy.evaluate(busy, clock.now)
    assert policy.next_change() == start + 10
    # Looking only at the deadlines suspends after the same 10 s as looking every second.
    decisions = sparse(policy, clock, busy, start + 11)
    assert decisions[-1].reason is Reason.OTHER_LOAD
    assert decisions[-1].since == pytest.approx(start + 10)
    assert policy.next_change() is None  # latched: only a new observation changes it now
    quiet_from = clock.now.timestamp()
    policy.evaluate(QUIET, clock.now)
    assert policy.next_change() == pytest.approx(quiet_from + 30)


def test_schedule_edge_and_override_end_are_when_to_look() -> None:
    policy = Policy(PolicySettings(schedule=Schedule.parse("mon-fri 18:00-08:00")))
    policy.evaluate(QUIET, MONDAY_NOON)
    assert policy.next_change() == MONDAY_NOON.replace(hour=18).timestamp()
    policy.override(MONDAY_NOON.timestamp() + 600)
    policy.evaluate(QUIET, MONDAY_NOON)
    assert policy.next_change() == MONDAY_NOON.timestamp() + 600
