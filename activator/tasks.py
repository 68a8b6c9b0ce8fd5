"""Owned tasks.

A bare asyncio.create_task can be garbage-collected while running and its exception is lost if nobody awaits
it. A Tasks registry names every task and keeps a strong reference until it finishes; an exception in a task
nobody awaits is logged instead of vanishing. The daemon's background work has one owner, the fleet's registry,
which shutdown cancels and awaits as one; spawn() is the process-wide registry for tasks whose own object waits
for or cancels them (a connection's activation, a flow, a service's start).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("activator")


class Tasks:
    """The running tasks one owner is answerable for."""

    def __init__(self) -> None:
        self._running: set[asyncio.Task[Any]] = set()

    def spawn(self, coro: Coroutine[Any, Any, T], name: str, *, awaited: bool = False) -> asyncio.Task[T]:
        """Start coro as a named task kept alive until done.

        awaited=True means some caller will await the task and handle its exception, so it is not logged here.
        """
        task = asyncio.create_task(coro, name=name)  # noqa: TID251 - this is the one sanctioned place
        task._activator_awaited = awaited  # type: ignore[attr-defined]
        task.add_done_callback(_report)
        self.adopt(task)
        return task

    def adopt(self, task: asyncio.Task[Any]) -> None:
        """Answer for a task started elsewhere until it ends (it stays in its first registry too)."""
        self._running.add(task)
        task.add_done_callback(self._running.discard)

    def cancel(self) -> None:
        for task in list(self._running):
            task.cancel()

    async def wait(self) -> None:
        """Until every task running now has ended (their exceptions were handled or logged already)."""
        if self._running:
            await asyncio.gather(*self._running, return_exceptions=True)

    def __iter__(self) -> Iterator[asyncio.Task[Any]]:
        return iter(list(self._running))

    def __len__(self) -> int:
        return len(self._running)


def _report(task: asyncio.Task[Any]) -> None:
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not getattr(task, "_activator_awaited", False):
        log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)


_loose = Tasks()


def spawn(coro: Coroutine[Any, Any, T], name: str, *, awaited: bool = False) -> asyncio.Task[T]:
    """A task owned by the object that starts it (which awaits or cancels it), kept alive until done."""
    return _loose.spawn(coro, name, awaited=awaited)
