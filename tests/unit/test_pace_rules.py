"""The heartbeat pace: the interval stretches with the fleet to keep the pool's rate bounded."""

from __future__ import annotations

from hivemind_worker.pool.pace import SEEDED_FOR_MS, Pace, Pacer, pace_for


def test_a_small_fleet_beats_at_the_configured_interval() -> None:
    assert pace_for(0, 10, 60, 100) == Pace(10, 60)
    assert pace_for(1000, 10, 60, 100) == Pace(10, 60)  # exactly 100 beats a second


def test_a_large_fleet_is_slowed_to_the_rate_and_leases_last_as_many_beats() -> None:
    assert pace_for(1001, 10, 60, 100) == Pace(11, 66)
    assert pace_for(10_000, 10, 60, 100) == Pace(100, 600)  # 100 beats a second
    assert pace_for(10_000, 10, 25, 50) == Pace(200, 500)  # the configured ratio, 2.5 beats


def test_no_rate_means_the_configured_pace_at_any_size() -> None:
    assert pace_for(1_000_000, 10, 60, 0) == Pace(10, 60)


def test_the_pace_follows_the_workers_that_are_still_beating() -> None:
    pacer = Pacer(10, 60, 100)
    t = 1_000_000
    for n in range(5000):
        pacer.seen(f"n{n}", t)
    pacer.seen("n0", t + 1000)  # a recount, at most once a second
    assert pacer.pace == Pace(50, 300)
    # Half the fleet goes quiet; the rest beats at the pace it was given.
    for step in range(1, 4):
        now = t + step * 50_000
        for n in range(2500):
            pacer.seen(f"n{n}", now)
    assert pacer.live == 2500  # the silent half forgotten after 2.5 intervals
    assert pacer.pace == Pace(25, 150)


def test_a_restarted_pool_counts_the_workers_it_had_until_they_are_back() -> None:
    pacer = Pacer(10, 60, 100)
    t = 5_000_000
    pacer.seed(3000, t)
    assert pacer.pace == Pace(30, 180)  # before any of them is back
    pacer.seen("n1", t + 2000)
    assert pacer.pace == Pace(30, 180)
    pacer.seen("n1", t + SEEDED_FOR_MS + 1000)  # the seed has run out; one worker is left
    assert pacer.pace == Pace(10, 60)
