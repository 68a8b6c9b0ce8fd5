"""keep_alive_schedule windows (config/schedule.py): parsing, refusals, and which minutes they cover."""

from __future__ import annotations

import pytest

from activator.config.schedule import active, describe, parse_window

MON, TUE, FRI, SAT, SUN = 0, 1, 4, 5, 6


def at(hh: int, mm: int = 0) -> int:
    return hh * 60 + mm


def test_weekday_hours() -> None:
    w = parse_window("mon-fri 08:00-18:00")
    assert describe(w) == "mon,tue,wed,thu,fri 08:00-18:00"
    assert active([w], MON, at(8)) and active([w], FRI, at(17, 59))
    assert not active([w], MON, at(7, 59)) and not active([w], MON, at(18))  # the end is exclusive
    assert not active([w], SAT, at(12))


def test_past_midnight_belongs_to_the_next_morning() -> None:
    w = parse_window("fri 22:00-02:00")
    assert active([w], FRI, at(23)) and active([w], SAT, at(1, 59))
    assert not active([w], FRI, at(1)) and not active([w], SAT, at(2)) and not active([w], SAT, at(23))
    sun = parse_window("sun 23:00-01:00")  # Sunday night runs into Monday
    assert active([sun], MON, at(0, 30)) and not active([sun], TUE, at(0, 30))


def test_day_lists_wrapping_ranges_and_every_day() -> None:
    assert active([parse_window("sat,sun 10:00-12:30")], SUN, at(12, 29))
    fri_mon = parse_window("fri-mon 09:00-10:00")
    assert [d for d in range(7) if active([fri_mon], d, at(9))] == [MON, FRI, SAT, SUN]
    every = parse_window("00:00-24:00")
    assert all(active([every], d, m) for d in range(7) for m in (0, 720, 1439))
    assert parse_window("* 07:30-09:00") == parse_window("07:30-09:00")
    assert not active([], MON, at(9))


@pytest.mark.parametrize(("text", "says"), [
    ("8-18", "is not a window"),
    ("mon-fri 8:00-18:00", "is not a window"),
    ("monday 08:00-09:00", "'monday' is not a day"),
    ("mon 08:00-08:00", "starts and ends at the same minute"),
    ("mon 24:00-01:00", "'24:00' is not a time of day"),
    ("mon 08:60-09:00", "'08:60' is not a time of day"),
])
def test_refusals_say_what_is_wrong(text: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        parse_window(text)
