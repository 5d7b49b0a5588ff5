"""blockd.clock: validity is judged at a time that never goes backwards, and keeps flowing."""

from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

from blockd.clock import MonotonicWallClock

T = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
S = timedelta(seconds=1)

# (wall offset s, monotonic s) -> expected (judged offset s, behind s)
STEPS = [
    ((0, 0), (0, 0)),
    ((10, 10), (10, 0)),          # both clocks advance together
    ((-86390, 20), (20, 86410)),  # the wall clock steps back a day: time keeps flowing from 10 s
    ((-86380, 30), (30, 86410)),
    ((40, 40), (40, 0)),          # fixed: the wall clock is right again
    ((290, 50), (290, 0)),        # a small forward step (a clock being corrected) is taken at once
]


def test_steps_back_are_ridden_out_and_forward_steps_taken(tmp_path: Path) -> None:
    clock = MonotonicWallClock(tmp_path / "clock.json")
    for (wall, mono), (judged, behind) in STEPS:
        assert clock.now(T + wall * S, float(mono)) == T + judged * S, (wall, mono)
        assert round(clock.step_back_s) == behind


def test_the_mark_survives_a_restart(tmp_path: Path) -> None:
    clock = MonotonicWallClock(tmp_path / "clock.json")
    clock.now(T, time.monotonic())
    clock.save()
    again = MonotonicWallClock(tmp_path / "clock.json")
    stepped_back = T - timedelta(days=1)
    judged = again.now(stepped_back, again._mono)
    assert T <= judged < T + 5 * S and round(again.step_back_s) >= 86400


def test_an_unreadable_mark_is_ignored(tmp_path: Path) -> None:
    (tmp_path / "clock.json").write_text("{not json")
    assert MonotonicWallClock(tmp_path / "clock.json").now(T, 0.0) == T


def test_a_big_forward_step_is_held_back_then_taken_if_it_lasts(tmp_path: Path) -> None:
    from blockd.clock import CONFIRM_S

    clock = MonotonicWallClock(tmp_path / "clock.json")
    assert clock.now(T, 0.0) == T
    year = timedelta(days=365)
    assert clock.now(T + year, 10.0) == T + 10 * S and clock.step_ahead_s > 0  # held: time flows from the mark
    assert clock.now(T + 20 * S, 20.0) == T + 20 * S and clock.step_ahead_s == 0  # fixed in time: nothing lost
    assert clock.now(T + year, 30.0) == T + 30 * S  # a new step is held again
    assert clock.now(T + year + CONFIRM_S * S, 30.0 + CONFIRM_S) == T + year + CONFIRM_S * S  # it lasted: taken


def test_a_first_start_on_a_clock_that_is_behind_uses_the_latest_acceptance(tmp_path: Path) -> None:
    clock = MonotonicWallClock(tmp_path / "clock.json", floor=T)
    assert clock.now(T - timedelta(days=45), time.monotonic()) >= T


def test_a_restart_after_downtime_takes_the_clock_as_it_is(tmp_path: Path) -> None:
    clock = MonotonicWallClock(tmp_path / "clock.json")
    clock.now(T, time.monotonic())
    clock.save()
    week_later = T + timedelta(days=7)
    again = MonotonicWallClock(tmp_path / "clock.json")
    assert again.now(week_later, time.monotonic()) == week_later and again.step_ahead_s == 0
