"""A service's state, shared by its parts: service.Service (admission, the checkpoint, samples, runtime control),
starts.Starting (starts, backoff, scale-out, the floor) and reaper.Reaping (idle timers, retiring, teardown).
Each part is a class of its own room over this one; Service puts them together. The decisions they carry out are
core's (admission, scaling, reaping, pool), on the clock passed in (core/clock.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from activator.checkpoints.instance import Instance
from activator.checkpoints.store import Checkpoint, CheckpointStore
from activator.config.service import ServiceConfig
from activator.core import scaling
from activator.core.capacity import Budget, FailureBackoff
from activator.core.clock import Clock, Timer
from activator.core.pool import SingleUse

from .clock import LoopClock
from .contracts import Launcher
from .metrics import ServiceMetrics
from .steering import Mode, Totals
from .userspace import UserspaceMode


@dataclass
class Timers:
    """The service's own clocks and watches on one of its instances (its counts are the instance's Tracking): when
    it went idle and the timer that looks at it then, idle_cpu_below's CPU mark, the pidfd its app's death is seen
    by."""

    idle_since: float
    idle_timer: Timer | None = None
    cpu_mark: tuple[float, float] | None = None  # (time, its CPU seconds) when the idle timer was last armed
    pidfd: int | None = None


class ServiceState:
    def __init__(
        self, config: ServiceConfig, *, launcher: Launcher, metrics: ServiceMetrics, budget: Budget,
        store: CheckpointStore | None = None, clock: Clock | None = None,
    ) -> None:
        self.clock: Clock = clock or LoopClock()
        self.config = config
        self.name = config.name
        self.store = store
        self.m = metrics
        self.launcher = launcher
        self.budget = budget
        #: how new connections reach its instances (steering.py); the lifecycle owner picks it (Fleet.use)
        self.mode: Mode = UserspaceMode()
        #: the kernel's cumulative counts last folded (they carry over a reload: take_counters_from)
        self.totals = Totals()
        self.arrived = 0  # connections the activator's own listeners took for it (admitted or not)
        self.instances: list[Instance] = []  # ready to take connections
        self.waiting = 0  # connections waiting in acquire_instance() for one
        self.open_connections = 0  # admitted and not yet released
        self.restore_backoff = FailureBackoff(config.backoff)
        self.start_backoff = FailureBackoff(config.backoff)
        #: why the service has no checkpoint (its build failed; retried with backoff), None otherwise
        self.checkpoint_problem: str | None = None
        self.checkpoint_retry_at = 0.0
        self._checkpoint: asyncio.Future[Checkpoint] = asyncio.get_running_loop().create_future()
        self._starts: set[asyncio.Task[Instance]] = set()
        self.started_total = 0
        self.kept_warm = False  # inside a keep_alive_schedule window (watchers.keep_alive_schedules says)
        self._stopping: set[asyncio.Task[None]] = set()
        self._releasing: set[Instance] = set()
        self._changed = asyncio.Event()
        self._replenish_timer: Timer | None = None
        self._closed = False
        # A stateful checkpoint (core.pool.stateful) serves one instance: from its start on, new starts wait for
        # the checkpoint made again once that instance is gone (used_up asks the lifecycle owner for it).
        self._single: SingleUse[Checkpoint] = SingleUse()
        self.used_up: Callable[[], None] | None = None
        self.stopped = False  # `activator stop`: refuses connections and keeps no instance until `activator start`
        # depends_on, as services (the lifecycle owner links them): dependencies are woken when this one starts an
        # instance, and keep their last instance while a dependant has one.
        self.dependencies: list[ServiceState] = []
        self.dependants: list[ServiceState] = []
        self._timers_of: dict[Instance, Timers] = {}  # from an instance's adoption until its teardown ends

    @property
    def starting(self) -> int:
        return len(self._starts)

    @property
    def max_instances(self) -> int:
        return scaling.max_instances(configured=self.config.max_instances, stateful=self._single.stateful)

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The one new instances start from (a stateful one while its single instance runs from it)."""
        if self._checkpoint.done() and not self._checkpoint.cancelled() and not self._checkpoint.exception():
            return self._checkpoint.result()
        return self._single.consumed

    @property
    def kernel_connections(self) -> int:
        return sum(i.track.kernel for i in self.instances)

    @property
    def floor(self) -> int:
        """Instances kept even when idle: min_instances, and one during a keep_alive_schedule window."""
        return scaling.floor(min_instances=self.config.min_instances, kept_warm=self.kept_warm)

    def held(self) -> list[str]:
        """The dependants that have (or are starting) an instance: while any does, our last one stays."""
        return [d.name for d in self.dependants if d.instances or d._starts]

    def _timers(self, inst: Instance) -> Timers:
        timers = self._timers_of.get(inst)
        if timers is None:
            timers = self._timers_of[inst] = Timers(idle_since=self.clock.now())
        return timers

    def _cancel_idle(self, inst: Instance) -> None:
        timers = self._timers_of.get(inst)
        if timers is not None and timers.idle_timer is not None:
            timers.idle_timer.cancel()
            timers.idle_timer = None

    def _own(self, task: asyncio.Task[Any]) -> None:
        """A task close() waits for (teardowns, sweeps, slot changes)."""
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    def _resteer(self) -> None:
        self.mode.set([i for i in self.instances if not i.track.withdrawn and not i.track.stopping], len(self._starts))

    def _notify(self) -> None:
        """Wake every waiter to re-evaluate (one Event per generation, so none misses a wake-up)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _publish(self) -> None:
        self.m.instances.set(len(self.instances))
        self.m.starting.set(len(self._starts))

    def reached_at(self, inst: Instance) -> tuple[str, int] | None:
        """Where a connection the activator holds reaches the instance through the service's mode (handoff: the
        service's own socket, which its app accepts from), or None: the instance is dialled itself."""
        return self.mode.address if self.mode.address is not None and self.mode.reaches(inst) else None

    # --- what one part asks of another (defined in reaper.Reaping, starts.Starting, service.Service) ------------

    def _stop(self, inst: Instance, *, graceful: bool = False) -> None:
        raise NotImplementedError

    def _arm_idle(self, inst: Instance, delay: float) -> None:
        raise NotImplementedError

    def _dependant_idle(self) -> None:
        raise NotImplementedError

    def wanted_by(self, dependant: ServiceState) -> None:
        raise NotImplementedError

    def _unwatch(self, inst: Instance) -> None:
        raise NotImplementedError

    def _replenish(self) -> None:
        raise NotImplementedError

    def _refresh_if_used_up(self) -> None:
        raise NotImplementedError

    def sweep_if_unused(self) -> None:
        raise NotImplementedError
