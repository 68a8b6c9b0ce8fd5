"""One service: admission, the checkpoint it starts from, what its kernel path's samples say, and runtime control
(wake, scale, stop, start, reload in place, shutdown). Its starts are starts.Starting's, its idle instances
reaper.Reaping's, its shared state servicestate.ServiceState's.

Admission is owned here, whole. admit() turns a new client connection into a Lease (lease.py) or refuses it
(Rejected, counted by reason): the service is shutting down, max_connections is reached, or the daemon's own
descriptor budget is spent (`resources`). The lease then acquires a ready instance (see core/pool.py for which
one, and when more are started); connections that need an instance that is not ready yet wait for it, at most
`max_waiting` of them, the rest are turned away at once. The lease releases what it counted exactly once.
What is decided here is decided in core/ (admission.py, pool.py, scaling.py); this module carries it out.

A service whose checkpoint could not be built refuses connections until a build succeeds (the lifecycle owner
retries), as a service backing off after failed starts does.

With a mode that steers (steering.py: the kernel path's DNAT rule, or handoff), ready instances also take
connections that never reach the activator. What the mode samples of them (fold(), a few times a second) counts
toward target_connections (scale-out), toward max_connections, as served, and as activity for the idle timer. A
failed instance leaves the mode's set at once.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from activator.checkpoints.instance import Instance
from activator.checkpoints.store import Checkpoint, CheckpointStore
from activator.config.service import ServiceConfig
from activator.core import admission, capacity, pool, reaping, scaling
from activator.core.admission import RejectionTally
from activator.core.capacity import Budget
from activator.core.clock import Clock, Timer
from activator.core.pool import Pick
from activator.errors import ActivatorError, Rejected
from activator.tasks import spawn

from . import servicestatus
from .contracts import Launcher
from .lease import Lease
from .metrics import ServiceMetrics
from .reaper import Reaping
from .starts import Starting
from .steering import Mode, Sample, counted_since

log = logging.getLogger("activator.service")


class Service(Reaping, Starting):
    def __init__(
        self, config: ServiceConfig, *, launcher: Launcher, metrics: ServiceMetrics, budget: Budget,
        store: CheckpointStore | None = None, clock: Clock | None = None,
    ) -> None:
        super().__init__(config, launcher=launcher, metrics=metrics, budget=budget, store=store, clock=clock)
        self._rejections = RejectionTally()
        self._previous_mode: Mode | None = None  # a reload's old definition's (take_counters_from)
        self._rejections_timer: Timer | None = None
        # Remaining backoff shrinks with time, and kernel-path connections change without us: both are computed
        # at scrape time, not when last touched.
        self.m.open_connections.set_function(lambda: self.open_connections + self.kernel_connections)
        self.m.backoff.set_function(self._backoff_seconds)
        self.m.restore_backoff.set_function(lambda: self.restore_backoff.remaining(self.clock.now()))
        self.m.standby_instances.set_function(lambda: len(self.launcher.standbys))
        self.m.standby_memory.set_function(lambda: sum(i.sandbox.memory_bytes() or 0
                                                       for i in list(self.launcher.standbys)))
        self._publish()

    def status(self) -> dict[str, Any]:
        return servicestatus.status(self)

    def switch_mode(self, mode: Mode) -> None:
        """From now on new connections reach the instances this way (Fleet.use picks it: modes.choose). The
        mode left behind steers no more; instances it reached keep what they have and drain."""
        previous, self._previous_mode = self._previous_mode or self.mode, None
        mode.carry_from(previous)
        if self.mode.steers:
            self.withdraw_all()
        self.mode.stop()
        self.mode = mode
        self._resteer()

    def set_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Use this checkpoint for new instances (a rebuild: running ones keep theirs until they go)."""
        if self._checkpoint.done():
            self._checkpoint = asyncio.get_running_loop().create_future()
        self._checkpoint.set_result(checkpoint)
        self._single.stateful = pool.stateful(self.config.stateful, bool(checkpoint.writes_volumes))
        self.m.checkpoint_pages_bytes.set(checkpoint.pages_bytes)
        self.m.checkpoint_created.set(checkpoint.created)
        self.m.checkpoint_outdated.set(0)
        if self.checkpoint_problem is not None:
            log.info("service=%s has a checkpoint now; serving", self.name)
        self.checkpoint_problem = None
        task = spawn(self._adopt(checkpoint), name=f"adopt-checkpoint:{self.name}")
        self._own(task)
        self._replenish()
        self._notify()

    async def _adopt(self, checkpoint: Checkpoint) -> None:
        """Slots for a replaced checkpoint go first (they mount its diff/), then it may be swept; then new slots."""
        await self.launcher.drop_slots_except(checkpoint)
        self.sweep_if_unused()
        if not self._closed:
            self.launcher.refill(checkpoint)

    def checkpoint_failed(self, why: str, retry_in: float) -> None:
        """The build failed and the service has no checkpoint: refuse connections until a retry succeeds."""
        if self.checkpoint is not None:
            return  # a failed rebuild: the current checkpoint keeps serving
        self.checkpoint_problem = why
        self.checkpoint_retry_at = self.clock.now() + retry_in
        self._notify()

    def sweep_if_unused(self) -> None:
        current = self.checkpoint
        if self.store is None or not all(i.checkpoint in (None, current)
                                         for i in (*self.instances, *self._releasing)):
            return
        store = self.store

        async def sweep() -> None:
            for d in await asyncio.to_thread(store.sweep_retired, self.name):
                log.info("service=%s removed replaced checkpoint %s", self.name, d.name)

        task = spawn(sweep(), name=f"sweep:{self.name}")
        self._own(task)

    def refusal(self) -> Rejected | None:
        """Why a new connection would be refused now, before any budget is asked (None: it would not be)."""
        return admission.refusal(self.name, closed=self._closed, stopped=self.stopped,
                                 max_connections=self.config.max_connections,
                                 open_connections=self.open_connections + self.kernel_connections)

    def admit(self) -> Lease:
        """Count a new client connection in, or raise Rejected (counted by the caller through reject())."""
        self.arrived += 1
        if (why := self.refusal()) is not None:
            raise why
        if not self.budget.take():
            raise Rejected("resources", f"the activator's file descriptor budget ({self.budget.limit} "
                                        "connections) is spent; raise LimitNOFILE")
        self.open_connections += 1
        return Lease(self)

    def connection_closed(self) -> None:
        self.open_connections -= 1
        self.budget.give()

    def take_counters_from(self, old: Service) -> None:
        """A new definition of the same service (a reload): the kernel's counts carry on, not start over."""
        self.totals, self.arrived = old.totals, old.arrived
        self._previous_mode = old.mode  # the mode Fleet.use picks for this one carries on from it
    def needs_wake(self) -> bool:
        """Would a connection arriving now make the service start an instance (or wait for one)?"""
        best = capacity.least_loaded(self.instances)
        return scaling.needs_wake(None if best is None else best.connections, target=self.config.target_connections,
                                  ready=len(self.instances), starting=len(self._starts),
                                  max_instances=self.max_instances)

    async def acquire_instance(self) -> tuple[Instance, bool]:
        target = self.config.target_connections
        waited = queued = False
        try:
            while True:
                if self._closed:
                    raise Rejected("shutting-down", f"service '{self.name}' is shutting down")
                pick, best = pool.choose(self.instances, target=target, starting=len(self._starts))
                if pick is Pick.TAKE:
                    break
                self._scale(extra=0 if queued else 1)  # then decide with the starts it asked for
                pick, best = pool.choose(self.instances, target=target, starting=len(self._starts))
                if pick is Pick.OVERFLOW:
                    break  # nothing more will come (max_instances or backoff): go above target
                if pick is Pick.REFUSE:
                    raise self._why_no_instance()
                if not queued:
                    if (full := admission.queue_full(self.name, waiting=self.waiting,
                                                     max_waiting=self.config.max_waiting)) is not None:
                        raise full
                    queued = True
                    self.waiting += 1
                    self.m.waiting.set(self.waiting)
                waited = True
                await self._changed.wait()
        finally:
            if queued:
                self.waiting -= 1
                self.m.waiting.set(self.waiting)
        assert best is not None  # TAKE and OVERFLOW come with an instance
        self.take(best)
        return best, waited

    def take(self, inst: Instance) -> None:
        inst.track.spliced += 1
        inst.track.served += 1
        self._cancel_idle(inst)

    async def unclaimed(self) -> tuple[Instance, bool]:
        """An instance for a UDP flow's first datagrams, claimed by nothing: a flow is not a connection until the
        app answers it (udp.py), so it neither keeps the instance nor counts toward scale-out or max_waiting. If
        nothing runs, one is started and waited for: a first datagram wakes the service, as a connection does.
        waited=True if a start was awaited. Raises Rejected."""
        waited = False
        while True:
            if (why := self.refusal()) is not None:
                raise why
            best = capacity.least_loaded(self.instances)
            if best is not None:
                return best, waited
            if not self._starts:
                self._scale(extra=1)
                if not self._starts:
                    raise self._why_no_instance()
            waited = True
            await self._changed.wait()

    def unhealthy(self) -> Rejected | None:
        """What a probe answered by the activator reports: None while a connection now would be served (an
        instance runs, or one may be started), else why not. A probe must never say a service that cannot start
        is up, so a balancer sends its clients elsewhere."""
        if self._closed:
            return Rejected("shutting-down", f"service '{self.name}' is shutting down")
        if self.stopped:
            return Rejected("stopped", f"service '{self.name}' is stopped")
        if self.instances:
            return None
        if self.checkpoint is None:
            return self._why_no_instance() if self.checkpoint_problem is not None else \
                Rejected("no-checkpoint", f"service '{self.name}' has no checkpoint yet", 1.0)
        if self.start_backoff.active(self.clock.now()):
            return self._why_no_instance()
        return None

    def _why_no_instance(self) -> Rejected:
        return admission.no_instance(self.name, checkpoint_problem=self.checkpoint_problem,
                                     has_checkpoint=self.checkpoint is not None, retry_at=self.checkpoint_retry_at,
                                     backoff_until=self.start_backoff.until, now=self.clock.now())

    def release_instance(self, inst: Instance) -> None:
        inst.track.spliced -= 1
        if inst.track.stopping:
            return
        then = reaping.released(spliced=inst.track.spliced, connections=inst.connections,
                                target=self.config.target_connections)
        if then.arm_idle:
            self._timers(inst).idle_since = self.clock.now()
            self._arm_idle(inst, self.config.idle_timeout)
        if then.room:
            self._notify()

    def _backoff_seconds(self) -> float:
        """Until an instance may be attempted: after failed starts, or (no checkpoint) until the next build."""
        return admission.backoff_seconds(
            checkpoint_problem=self.checkpoint is None and self.checkpoint_problem is not None,
            retry_at=self.checkpoint_retry_at, backoff_until=self.start_backoff.until, now=self.clock.now())

    def reject(self, why: Rejected) -> None:
        """Count a connection closed by admission control; log the tally, but not once per connection."""
        self.m.rejected[why.reason].inc()
        self._tally(why.reason, 1, str(why))

    def _tally(self, reason: str, n: int, latest: str) -> None:
        """At most one log line per interval (core.admission.RejectionTally)."""
        due = self._rejections.add(reason, n, latest, self.clock.now())
        if not due:
            self._log_rejections()
        elif self._rejections_timer is None:
            self._rejections_timer = self.clock.call_later(due, self._log_rejections)

    def _log_rejections(self) -> None:
        if self._rejections_timer is not None:
            self._rejections_timer.cancel()
            self._rejections_timer = None
        line = self._rejections.line(self.clock.now())
        if line is not None:
            log.warning("service=%s connections closed by admission control: %s", self.name, line)

    def fold(self, sample: Sample, now: float) -> None:
        """Fold what the service's mode saw (steering.Sample, the same for every mode) into its instances and its
        metrics: an instance with traffic is in use, connections the kernel gave it count as served, what waits
        for an instance counts toward scale-out."""
        if (totals := sample.totals) is not None:
            last, self.totals = self.totals, totals
            if (n := counted_since(totals.rejected, last.rejected)) > 0:
                self.m.rejected["max-connections"].inc(n)
                self._tally("max-connections", n, f"refused in the kernel: service '{self.name}' has "
                                                  f"{self.config.max_connections} open connections")
            self.m.connections.inc(counted_since(totals.connections, last.connections))
            self.m.udp_replies_dropped.inc(counted_since(totals.replies_dropped, last.replies_dropped))
        for inst, s in sample.instances.items():
            if inst not in self.instances:
                continue
            if s.active:
                self._timers(inst).idle_since = now
                if (s.new or s.open) and not inst.track.established:
                    inst.track.established = 1
                    self.proved(inst)
            self.m.bytes_in.inc(s.bytes_in)
            self.m.bytes_out.inc(s.bytes_out)
            inst.track.kernel = s.open
            inst.track.kernel_served += s.new
        if sample.left:
            self._resteer()
        self._scale(extra=sample.waiting)

    async def stop_serving(self, drain_timeout: float) -> None:
        """Refuse new connections (reason `stopped`), take every instance out of the kernel path, let open
        connections finish (drain_timeout), then stop every instance. Listeners stay bound (systemd's too)."""
        self.stopped = True
        if self._replenish_timer is not None:
            self._replenish_timer.cancel()
            self._replenish_timer = None
        self.withdraw_all()
        await self.launcher.set_standby(0, None)
        deadline = self.clock.now() + drain_timeout
        while self.open_connections + self.kernel_connections and self.clock.now() < deadline:
            await self.clock.sleep(0.1)
        for task in list(self._starts):
            task.cancel()
        for inst in list(self.instances):
            self._stop(inst, graceful=True)
        while self._stopping:
            await asyncio.gather(*list(self._stopping), return_exceptions=True)

    def reconfigure(self, config: ServiceConfig) -> None:
        """A reload changed only keys its decisions read (core.reloadplan.IN_PLACE): take the new definition and
        keep the instances. What was derived from the old one is derived again: idle timers (measured from when
        each instance went idle, so one idle longer than the new idle_timeout goes now), standbys, the floor."""
        old, self.config = self.config, config
        self.restore_backoff.policy = self.start_backoff.policy = config.backoff
        if not self._closed:
            for inst in list(self.instances):
                t = inst.track
                if reaping.looked_at_again(spliced=t.spliced, stopping=t.stopping, withdrawn=t.withdrawn):
                    self._arm_idle(inst, 0)
            if not self.stopped:
                if config.standby != old.standby:
                    self._own(spawn(self.launcher.set_standby(config.standby, self.checkpoint),
                                    name=f"standby:{self.name}"))
                self._replenish()
        self._publish()
        self._notify()

    def start_serving(self) -> None:
        """Serve again: connections are admitted, min_instances kept warm."""
        self.stopped = False
        self._resteer()
        self._replenish()
        self._own(spawn(self.launcher.set_standby(self.config.standby, self.checkpoint), name=f"standby:{self.name}"))

    async def kill_all(self, why: str) -> None:
        """Kill every instance now, without asking its app first (it is hostile), and stop the starts under way;
        returns once each is released (its processes gone)."""
        await self._cancel_starts()
        killed = list(self.instances)
        for inst in killed:
            log.warning("service=%s instance=%s killed: %s", self.name, inst.name, why)
            self._stop(inst)
        while any(inst in self._releasing for inst in killed):
            await self.clock.sleep(0.02)

    def withdraw_all(self) -> None:
        """Stop steering new connections to any instance (shutdown: they drain, then go). An app that accepts from
        the service's socket can only be asked to stop accepting: it is stopped gracefully (its SIGTERM handler
        closes its listener and lets its requests finish)."""
        for inst in self.instances:
            inst.track.withdrawn = True
        self._resteer()
        for inst in [i for i in self.instances if self.reached_at(i) is not None]:  # it accepts from our socket
            self._stop(inst, graceful=True)

    async def close(self) -> None:
        """Kill every instance and release everything. Idempotent."""
        self._closed = True
        self._log_rejections()  # the tally since the last line
        self.withdraw_all()
        if self._replenish_timer is not None:
            self._replenish_timer.cancel()
        if not self._checkpoint.done():
            self._checkpoint.set_exception(ActivatorError(f"service '{self.name}' is shutting down"))
            self._checkpoint.exception()  # retrieved here: no start may be waiting for it
        self._notify()
        await self._cancel_starts()
        for inst in list(self.instances):
            self._stop(inst, graceful=True)
        await self.launcher.close()
        while self._stopping:
            await asyncio.gather(*list(self._stopping), return_exceptions=True)
