"""The event loop a command's asynchronous part runs in (uvloop, as the daemon's)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any


def run_async(coro_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_factory())
