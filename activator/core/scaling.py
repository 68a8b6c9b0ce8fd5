"""How many instances to start, and when: for the demand a service sees (scale-out) and for the floor it keeps
warm (min_instances, a keep_alive_schedule window), and how a start begins (a restore, or its fallback while
restores back off). Plain functions of the pool's counts and the backoff's state;
daemon/starts.py spawns the starts and arms the retry timer. The arithmetic of demand against target is
core/capacity.py's.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .capacity import starts_needed


def may_start(*, closed: bool, stopped: bool, backing_off: bool, checkpoint_problem: bool) -> bool:
    """Whether demand may start anything now: never while shutting down, stopped, backing off after failed
    starts, or with no checkpoint to start from (its build failed)."""
    return not (closed or stopped or backing_off or checkpoint_problem)


def scale_out(*, allowed: bool, demand: int, ready: int, starting: int, target: int, max_instances: int) -> int:
    """Starts to spawn now for `demand` connections (those on ready instances, the waiting ones and new ones)."""
    if not allowed:
        return 0
    return starts_needed(demand=demand, ready=ready, starting=starting, target=target, max_instances=max_instances)


def floor(*, min_instances: int, kept_warm: bool) -> int:
    """Instances kept even when idle: min_instances, and one during a keep_alive_schedule window."""
    return max(min_instances, 1 if kept_warm else 0)


def max_instances(*, configured: int, stateful: bool) -> int:
    """A stateful checkpoint serves one instance at a time (core.pool.stateful)."""
    return 1 if stateful else configured


@dataclass(frozen=True)
class Replenish:
    starts: int = 0  # to spawn now
    retry_in: float | None = None  # backing off: look again after this long


def replenish(*, serving: bool, backoff_remaining: float, floor: int, ready: int, starting: int) -> Replenish:
    """Keep the floor warm: `serving` is false while closed, stopped or without a checkpoint (a new one, or a
    start, calls this again); after failed starts, once the backoff ends."""
    if not serving:
        return Replenish()
    if backoff_remaining > 0:
        return Replenish(retry_in=backoff_remaining)
    return Replenish(starts=max(0, floor - ready - starting))


def retry_armed(*, floor: int, armed: bool, closed: bool) -> bool:
    """Whether a failed start arms a replenish retry: only a service with a floor to keep needs one (for the
    others, the next connection asks), and one is enough."""
    return bool(floor) and not armed and not closed


def needs_wake(least_connections: int | None, *, target: int, ready: int, starting: int, max_instances: int) -> bool:
    """Would a connection arriving now make the service start an instance (or wait for one)? `least_connections`
    is the least loaded instance's count (None: nothing runs)."""
    if least_connections is None:
        return True
    if least_connections < target:
        return False
    return ready + starting < max_instances


class Attempt(enum.Enum):
    RESTORE = "restore"
    COLD_START = "cold-start"  # from the image, without the checkpoint
    REFUSE = "refuse"  # no start at all: restores back off and there is no fallback


def first_attempt(*, restores_backing_off: bool, fallback: str) -> Attempt:
    """How a start begins: a restore, unless restores are backing off after failures (then the fallback, if any)."""
    if not restores_backing_off:
        return Attempt.RESTORE
    return Attempt.REFUSE if fallback == "none" else Attempt.COLD_START


def after_failed_restore(*, fallback: str) -> Attempt:
    """A restore failed: a cold start, unless `fallback: none` (the failure is the start's)."""
    return Attempt.REFUSE if fallback == "none" else Attempt.COLD_START
