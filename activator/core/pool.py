"""A service's pool of instances, decided: which instance a connection gets, whether it must wait for a start, and
whether a checkpoint serves one instance only. Plain functions of the pool's state; daemon/service.py carries the
decisions out. What becomes of an idle instance: core/reaping.py.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from .capacity import L, least_loaded

C = TypeVar("C")


class Pick(enum.Enum):
    TAKE = "take"  # the least loaded ready instance has room: take it
    OVERFLOW = "overflow"  # every instance is at target and no more will come: take the least loaded anyway
    WAIT = "wait"  # an instance is starting (or about to): wait for it
    REFUSE = "refuse"  # nothing runs and nothing starts (backoff, no checkpoint): refuse


def choose(instances: Sequence[L], *, target: int, starting: int) -> tuple[Pick, L | None]:
    """For one connection: the instance to take, or whether to wait for one being started (`starting` counts the
    starts under way once the pool has asked for the ones this connection needs)."""
    best = least_loaded(instances)
    if best is not None and best.connections < target:
        return Pick.TAKE, best
    if best is not None and not starting:
        return Pick.OVERFLOW, best
    if best is None and not starting:
        return Pick.REFUSE, None
    return Pick.WAIT, None


def stateful(setting: bool | str, writes_volumes: bool) -> bool:
    """Is a checkpoint good for one instance only (`stateful`: true, or auto and its app held files of a writable
    volume open for writing when it was dumped)? Such an app keeps its volume's data in memory (a database): an
    instance restored from the same dump after another one changed the volume would see the data as it was, and
    could write over it. So it runs one instance at a time and its checkpoint is made again after each."""
    return setting is True or (setting == "auto" and writes_volumes)


@dataclass
class SingleUse(Generic[C]):
    """A stateful checkpoint's one use: from the start of its instance on, new starts wait for the checkpoint made
    again once that instance is gone (from the volumes as they are then)."""

    stateful: bool = False
    consumed: C | None = None  # the used-up checkpoint, while anything runs from it
    consuming: bool = False  # the start that used it up is under way

    def consume(self, checkpoint: C) -> bool:
        """A start from `checkpoint` is about to begin: True if it uses the checkpoint up (the start's own)."""
        if not self.stateful or self.consumed is not None:
            return False
        self.consumed, self.consuming = checkpoint, True
        return True

    def refresh_due(self, *, running: bool, closed: bool) -> bool:
        """Whether to have it made again now (once: it is forgotten here): nothing runs from it any more (`running`:
        instances up or being released) and its start is over."""
        if self.consumed is None or self.consuming or running or closed:
            return False
        self.consumed = None
        return True
