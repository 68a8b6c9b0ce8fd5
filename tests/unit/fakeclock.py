"""A clock (core/clock.py) that only moves when a test says so: advance() runs the timers that fall due, in
order, each at its own time, and lets the tasks they wake run before the next one. A timeout is tested by
advancing past it, never by waiting for it."""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field

#: loop iterations settle() gives woken tasks: a start, a teardown or a reap is a chain of a few awaits each
SETTLE_ROUNDS = 50


@dataclass(order=True)
class FakeTimer:
    when: float
    seq: int
    fn: Callable[[], None] = field(compare=False)
    cancelled: bool = field(default=False, compare=False)

    def cancel(self) -> None:
        self.cancelled = True


async def settle() -> None:
    """Let every task that can run without time passing run (no timer of the loop's is involved)."""
    loop = asyncio.get_running_loop()
    for _ in range(SETTLE_ROUNDS):
        step: asyncio.Future[None] = loop.create_future()
        loop.call_soon(step.set_result, None)
        await step


class FakeClock:
    def __init__(self, start: float = 1000.0) -> None:
        self._now = start
        self._due: list[FakeTimer] = []
        self._seq = itertools.count()

    def now(self) -> float:
        return self._now

    def call_later(self, delay: float, fn: Callable[[], None]) -> FakeTimer:
        timer = FakeTimer(self._now + max(0.0, delay), next(self._seq), fn)
        heapq.heappush(self._due, timer)
        return timer

    async def sleep(self, delay: float) -> None:
        if delay <= 0:  # one turn of the loop, as a zero sleep is
            step: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            asyncio.get_running_loop().call_soon(step.set_result, None)
            await step
            return
        woken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.call_later(delay, lambda: None if woken.done() else woken.set_result(None))
        await woken

    @property
    def pending(self) -> int:
        """Timers armed and not cancelled."""
        return sum(not t.cancelled for t in self._due)

    async def advance(self, seconds: float) -> None:
        """Move time on by `seconds`, firing what falls due on the way (each at its own time)."""
        target = self._now + seconds
        await settle()
        while self._due and self._due[0].when <= target:
            timer = heapq.heappop(self._due)
            self._now = max(self._now, timer.when)
            if not timer.cancelled:
                timer.fn()
                await settle()
        self._now = target
        await settle()
