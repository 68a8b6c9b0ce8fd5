"""keep_alive_schedule: the hours a service is kept warm, as cron-like windows in the host's time zone.

    "mon-fri 08:00-18:00"   weekdays from 08:00 up to (not including) 18:00
    "sat,sun 10:00-12:30"   a list of days
    "* 00:00-24:00"         every day, all day (the day may be left out: "07:30-09:00")
    "fri 22:00-02:00"       an end before the start runs past midnight: Friday 22:00 to Saturday 02:00

Minutes are the resolution. A window is checked against the local time the caller passes in (the daemon reads the
clock each minute), so a change to or from daylight saving time moves the windows with the wall clock, as cron's
do."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

DAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")  # tm_wday order: Monday is 0
_WINDOW = re.compile(r"(?:(?P<days>\S+)\s+)?(?P<start>\d\d:\d\d)-(?P<end>\d\d:\d\d)")
MINUTES_A_DAY = 24 * 60


@dataclass(frozen=True)
class Window:
    days: frozenset[int]  # the days a window starts on (0 = Monday)
    start: int  # minute of the day
    end: int  # minute of the day, exclusive; at or before start: the window ends on the next day

    def covers(self, weekday: int, minute: int) -> bool:
        if self.start < self.end:
            return weekday in self.days and self.start <= minute < self.end
        # past midnight: the evening part on a listed day, the morning part on the day after one
        return (weekday in self.days and minute >= self.start) or ((weekday - 1) % 7 in self.days
                                                                   and minute < self.end)


def _minute(text: str, *, end: bool) -> int:
    hours, minutes = int(text[:2]), int(text[3:])
    if minutes > 59 or hours > 24 or (hours == 24 and (minutes or not end)):
        raise ValueError(f"'{text}' is not a time of day (00:00 to 23:59, or 24:00 as an end)")
    return hours * 60 + minutes


def _days(text: str) -> frozenset[int]:
    if text == "*":
        return frozenset(range(7))
    found: set[int] = set()
    for part in text.lower().split(","):
        first, _, last = part.partition("-")
        if first not in DAYS or (last and last not in DAYS):
            raise ValueError(f"'{part}' is not a day or a range of days (mon, tue, ... sun; mon-fri; *)")
        a, b = DAYS.index(first), DAYS.index(last or first)
        found.update(range(a, b + 1) if a <= b else [*range(a, 7), *range(0, b + 1)])  # fri-mon wraps
    return frozenset(found)


def parse_window(text: str) -> Window:
    m = _WINDOW.fullmatch(text.strip())
    if m is None:
        raise ValueError(f"'{text}' is not a window: use [DAYS] HH:MM-HH:MM, e.g. 'mon-fri 08:00-18:00'")
    start, end = _minute(m["start"], end=False), _minute(m["end"], end=True)
    if start == end:
        raise ValueError(f"'{text}' starts and ends at the same minute; for all day use 00:00-24:00")
    return Window(_days(m["days"] or "*"), start, end)


def active(windows: Iterable[Window], weekday: int, minute: int) -> bool:
    """Is (weekday, minute of the day), local time, inside any of the windows?"""
    return any(w.covers(weekday, minute) for w in windows)


def describe(w: Window) -> str:
    days = "*" if len(w.days) == 7 else ",".join(DAYS[d] for d in sorted(w.days))
    return f"{days} {w.start // 60:02d}:{w.start % 60:02d}-{w.end // 60:02d}:{w.end % 60:02d}"
