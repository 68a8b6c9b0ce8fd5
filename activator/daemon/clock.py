"""The real clock (core/clock.py): monotonic time, and the running event loop's timers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


class LoopClock:
    def now(self) -> float:
        return time.monotonic()

    def call_later(self, delay: float, fn: Callable[[], None]) -> asyncio.TimerHandle:
        return asyncio.get_running_loop().call_later(delay, fn)

    async def sleep(self, delay: float) -> None:
        await asyncio.sleep(delay)
