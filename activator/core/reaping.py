"""What becomes of an idle instance, decided: reaped, retired from the kernel path first, kept (min_instances, a
dependant, a busy CPU) or looked at again later, and when. Plain functions of an instance's state and a time
passed in; daemon/reaper.py arms the timers and carries the verdicts out.
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

#: a remaining idle time below this is no time at all (a timer that fired a hair early)
EPSILON = 0.001
#: after an instance leaves the rule, how long before its connections are counted: a SYN DNATed just before may
#: not have its conntrack entry confirmed yet (a dump shows confirmed ones only)
WITHDRAW_SETTLE = 0.05
#: how often a retired instance's half-open handshakes are counted again
RECOUNT_EVERY = 0.05


class Idle(enum.Enum):
    WAIT_FOR_EVENTS = "wait"  # busy on the userspace path, stopping or being retired: an event re-arms it
    REARM = "rearm"  # look again after `delay`
    KEPT_FOR_DEPENDANT = "kept-for-dependant"  # idle, but the last instance of a dependency in use
    KEPT_WARM = "kept-warm"  # idle, but within min_instances
    REAP = "reap"  # idle long enough: stop it
    RETIRE = "retire"  # idle long enough, on the kernel path: out of the rule first, then count its connections
    BUSY_CPU = "busy-cpu"  # no connection for long enough, but its app used CPU (idle_cpu_below): look again later


@dataclass(frozen=True)
class InstanceView:
    """What the idle check reads of an instance."""

    stopping: bool
    spliced: int  # open connections through the activator
    withdrawn: bool  # already out of the steering rule (being retired)
    kernel: int  # open kernel-path connections, as last sampled
    idle_since: float
    steerable: bool  # it has an address on the bridge the kernel can steer to
    cpu_share: float | None = None  # CPU its processes used since its idle timer was armed, per second (None: unknown)


@dataclass(frozen=True)
class IdleVerdict:
    action: Idle
    delay: float | None = None  # for REARM and the KEPT_* ones: when to look again (None: when an event says)
    idle_since: float | None = None  # the instance's new idle_since, if it changes (kernel connections seen)


def idle_check(inst: InstanceView, *, now: float, idle_timeout: float, instances: int, min_instances: int,
               held_by: Sequence[str], steered: bool, cpu_below: float | None = None) -> IdleVerdict:
    """An instance's idle timer fired at `now`: what to do with it. `instances` is how many the pool has, `held_by`
    the dependants that have an instance (depends_on), `steered` whether the service has a kernel path,
    `cpu_below` the idle_cpu_below policy (an app busy by CPU is not idle, however long without a connection)."""
    if inst.stopping or inst.spliced > 0 or inst.withdrawn:
        return IdleVerdict(Idle.WAIT_FOR_EVENTS)
    idle_since = inst.idle_since
    # Open kernel-path connections: busy, and no event will say when they end.
    seen = now if inst.kernel > 0 else None
    if seen is not None:
        idle_since = seen
    remaining = idle_since + idle_timeout - now
    if remaining > EPSILON:
        return IdleVerdict(Idle.REARM, remaining, seen)
    if cpu_below is not None and inst.cpu_share is not None and inst.cpu_share >= cpu_below:
        # Working on its own: idle only after a whole quiet window from now (its CPU is measured over that).
        return IdleVerdict(Idle.BUSY_CPU, idle_timeout, now)
    if instances == 1 and held_by:
        return IdleVerdict(Idle.KEPT_FOR_DEPENDANT, idle_timeout, seen)
    if instances <= min_instances:
        # kernel connections send no events, so a steered service looks again; otherwise a connection's end does
        return IdleVerdict(Idle.KEPT_WARM, idle_timeout if steered else None, seen)
    if not steered or not inst.steerable:
        return IdleVerdict(Idle.REAP, None, seen)
    return IdleVerdict(Idle.RETIRE, None, seen)


def retired(*, still_open: int, half_open: int, spliced: int, past_deadline: bool) -> bool | None:
    """An instance out of the steering rule, its kernel connections counted: True to reap it, False to put it
    back (a connection got in before the rule changed), None to count again (only half-open handshakes, which
    either finish or time out; a spoofed SYN never finishes, hence the deadline)."""
    if not still_open and half_open and not past_deadline:
        return None
    return not (still_open or spliced)


def cpu_share(mark: tuple[float, float] | None, cpu: float | None, now: float) -> float | None:
    """CPU per second an instance's processes used since `mark` (when its idle timer was armed, and its CPU seconds
    then) up to `now`, when they stand at `cpu`; None when either is unknown or no time has passed."""
    if mark is None or cpu is None:
        return None
    since, before = mark
    return None if now <= since else max(0.0, cpu - before) / (now - since)


def retire_deadline(now: float, half_open_timeout: float) -> float:
    """When a retired instance's half-open handshakes stop counting (a spoofed SYN never finishes): the kernel
    drops them after half_open_timeout, give or take a second."""
    return now + half_open_timeout + 1


def looked_at_again(*, spliced: int, stopping: bool, withdrawn: bool) -> bool:
    """Whether an instance's idle timer is re-armed when what it depends on changes (a reload, a keep_alive
    window's end): one with a connection, stopping or being retired is re-armed by that event instead."""
    return not (spliced or stopping or withdrawn)


@dataclass(frozen=True)
class Released:
    arm_idle: bool  # its last activator connection: idle from now, for idle_timeout
    room: bool  # just below target again: a waiter may take it instead of waiting for a start


def released(*, spliced: int, connections: int, target: int) -> Released:
    """A connection through the activator ended; `spliced` and `connections` are the instance's counts after it."""
    return Released(arm_idle=spliced == 0, room=connections == target - 1)
