"""The clock a service's decisions run on, as an interface: the daemon passes the event loop's (daemon/clock.py),
unit tests a fake they move on by hand, so a timeout is tested by saying "now it is 5 s later", not by waiting."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol


class Timer(Protocol):
    def cancel(self) -> None: ...


class Clock(Protocol):
    def now(self) -> float: ...  # monotonic seconds

    def call_later(self, delay: float, fn: Callable[[], None]) -> Timer: ...

    async def sleep(self, delay: float) -> None: ...
