"""A service's pool of instances, decided: which instance a connection gets, whether it must wait for a start,
and what becomes of an idle instance. Plain functions of the pool's state and a time passed in; daemon/service.py
carries the decisions out (timers, tasks, the kernel's steering rules, the instances themselves).
"""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass

from .capacity import L, least_loaded

#: a remaining idle time below this is no time at all (a timer that fired a hair early)
EPSILON = 0.001


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


def stateful(setting: bool | str, writes_volumes: bool) -> bool:
    """Is a checkpoint good for one instance only (`stateful`: true, or auto and its app held files of a writable
    volume open for writing when it was dumped)? Such an app keeps its volume's data in memory (a database): an
    instance restored from the same dump after another one changed the volume would see the data as it was, and
    could write over it. So it runs one instance at a time and its checkpoint is made again after each."""
    return setting is True or (setting == "auto" and writes_volumes)
