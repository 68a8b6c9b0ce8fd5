"""Owned tasks.

A bare asyncio.create_task can be garbage-collected while running and its exception is lost if nobody awaits
it. spawn() names every task and keeps a strong reference until it finishes; an exception in a task nobody
awaits is logged instead of vanishing.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

log = logging.getLogger("activator")
_running: set[asyncio.Task[Any]] = set()


def _done(task: asyncio.Task[Any]) -> None:
    _running.discard(task)
    if task.cancelled():
        return
    exc = task.exception()
    if exc is not None and not getattr(task, "_activator_awaited", False):
        log.error("task %s failed: %r", task.get_name(), exc, exc_info=exc)


def spawn(coro: Coroutine[Any, Any, T], name: str, *, awaited: bool = False) -> asyncio.Task[T]:
    """Start coro as a named task that is kept alive until done.

    awaited=True means some caller will await the task and handle its exception, so it is not logged here.
    """
    task = asyncio.create_task(coro, name=name)  # noqa: TID251 - this is the one sanctioned place
    task._activator_awaited = awaited  # type: ignore[attr-defined]
    _running.add(task)
    task.add_done_callback(_done)
    return task
