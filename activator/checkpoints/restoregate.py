"""Restores across all services: how many run at once, and whether any is under way.

Restores are CPU-bound (CRIU, the app's first steps): on a few cores twenty at once all finish late, a few at a
time most finish early and the last no later. Preparing the next slots (a namespace, veth, overlay and an idle
CRIU per slot) is CPU work too, and it can wait: it waits for a moment with no restore under way or queued, for
at most a bound, so a steady stream of restores cannot starve it. Twenty small services woken at once reached
their first byte at p50 272 ms with each one's slot remade behind it and competing (bench/scaleout.py).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator


class RestoreGate:
    def __init__(self, at_once: int) -> None:
        self._slots = asyncio.Semaphore(at_once)
        self._pending = 0  # under way or queued for a turn
        self._quiet = asyncio.Event()
        self._quiet.set()

    @property
    def pending(self) -> int:
        return self._pending

    @contextlib.asynccontextmanager
    async def turn(self) -> AsyncIterator[None]:
        """One restore's turn (queued while `at_once` run)."""
        self._pending += 1
        self._quiet.clear()
        try:
            async with self._slots:
                yield
        finally:
            self._pending -= 1
            if not self._pending:
                self._quiet.set()

    async def quiet(self, longest: float) -> None:
        """Until no restore is under way or queued, or `longest` seconds."""
        if self._pending:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._quiet.wait(), longest)
