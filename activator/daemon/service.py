"""One service's instances: restore on demand, scale out from the one checkpoint, admission control, reap.

Admission is owned here, whole. admit() turns a new client connection into a Lease or refuses it (Rejected,
counted by reason): the service is shutting down, max_connections is reached, or the daemon's own descriptor
budget is spent (`resources`). The lease then acquires a ready instance (see core/pool.py for which one, and
when more are started); connections that need an instance that is not ready yet wait for it, at most
`max_waiting` of them, the rest are turned away at once. The lease releases what it counted exactly once.
Each start is its own task, shielded from the connections waiting on it, so a client that gives up cancels
nothing for the others.

What is decided here is decided by core/pool.py (which instance a connection takes, whether it waits, what an
idle instance becomes) and core/capacity.py (how many to start); this module carries the decisions out.

A start (checkpoints/instance.py, through the launcher passed in) is a restore from the checkpoint into a slot
prepared ahead (one CRIU request, bounded by restore_timeout); a restored app listens by construction, and its
first accepted connection proves the start (within connect_timeout). A failed restore falls back to a cold
start from the image unless `fallback: none`, and further restores back off (new instances are cold-started
meanwhile). A start that yields no instance at all backs the whole service off: until it expires, connections
that would need a new instance are closed at once instead of piling up behind another attempt. A service whose
checkpoint could not be built is in the same state until a build succeeds (the lifecycle owner retries).

With a kernel path (net/network.py: instances on the bridge, no PROXY header), ready instances are also in the
service's steering rule, and most connections never reach the activator: the kernel sends them straight to an
instance. Their count comes from conntrack samples (kernel_sample(), a few times a second); it counts toward
target_connections (scale-out), toward max_connections, and as activity for the idle timer. A failed instance is
withdrawn from the rule at once.

An instance is reaped when it has had no open connection on either path for idle_timeout, unless that would
leave fewer than min_instances. The timer re-checks the instance when it fires instead of trusting the moment it
was armed. A steered instance is first withdrawn from the rule, then its kernel connections are counted afresh:
one that slipped in before the rule changed puts it back. An instance is taken out of the pool before any
await, so a connection can never be handed an instance that is being killed (single-threaded event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from typing import Any, Protocol

from activator.checkpoints.instance import Instance
from activator.checkpoints.store import Checkpoint, CheckpointStore
from activator.config.model import ServiceConfig, signal_number
from activator.core import admission, capacity, pool, reaping, scaling
from activator.core.admission import RejectionTally
from activator.core.capacity import Budget, FailureBackoff
from activator.core.clock import Clock, Timer
from activator.core.pool import Pick, SingleUse
from activator.core.reaping import Idle
from activator.errors import ActivatorError, Rejected, RestoreError, StartError
from activator.net.network import Attachment
from activator.runtime.readiness import Connect, http_ok
from activator.tasks import spawn

from .clock import LoopClock
from .handoff import HandoffSample
from .metrics import ServiceMetrics

log = logging.getLogger("activator.service")



class Steering(Protocol):
    """A service's kernel path (network.ServiceSteering: a DNAT rule; handoff.HandoffSteering: the apps accept from
    the service's socket): which instances the kernel sends new connections to."""

    #: how long a half-open kernel-path connection lives (a spoofed SYN's entry goes after this)
    half_open_timeout: float
    #: handoff (handoff.py): the service socket's address, where a held connection reaches an app; else None
    address: tuple[str, int] | None

    def set(self, instances: list[Instance], starting: int = 0) -> None: ...

    def open_count(self, inst: Instance) -> tuple[int, int]: ...  # blocking: (open, half-open) from conntrack


class ServiceSandbox(Protocol):
    """What a service (and its steering) uses of an instance's sandbox (runtime.sandbox.Sandbox is one; the unit
    tests' fake is checked against this by mypy)."""

    @property
    def name(self) -> str: ...

    @property
    def attachment(self) -> Attachment | None: ...

    def pid_now(self) -> int | None: ...

    async def stop(self, sig: int, grace: float) -> str: ...

    @property
    def frozen(self) -> bool: ...

    async def freeze(self) -> None: ...

    def thaw(self) -> None: ...

    def socket_inodes(self) -> set[int]: ...  # blocking

    def cpu_seconds(self) -> float | None: ...  # CPU its processes used (None: no cgroup to ask)

    def connector(self, port: int) -> Connect: ...  # connections to the app inside its network namespace

    async def release(self) -> None: ...


class Launcher(Protocol):
    """What a service needs to bring up instances (checkpoints.instance.InstanceLauncher is one; unit tests pass
    a fake that mypy checks against this)."""

    async def restore(self, checkpoint: Checkpoint) -> Instance: ...

    async def cold_start(self, checkpoint: Checkpoint) -> Instance: ...

    #: instances restored ahead and frozen (restore() thaws one of these first), and how many are kept
    standbys: list[Instance]
    standby: int
    #: handoff: the service's listening socket, put into each restored app (None: the app listens on its own)
    listener: socket.socket | None

    def refill(self, checkpoint: Checkpoint) -> None: ...  # prepare standbys and slots for it

    async def set_standby(self, n: int, checkpoint: Checkpoint | None) -> None: ...

    async def drop_slots_except(self, checkpoint: Checkpoint) -> None: ...

    async def reshare(self, ksm: Any) -> None: ...  # share memory (a ksm.Ksm) or not (None) from now on

    async def rehand(self, listener: socket.socket | None) -> None: ...  # handoff: restores get this socket now

    async def close(self) -> None: ...


class Lease:
    """One client connection's claim on its service, from admission until release(), which counts it out
    exactly once (and the instance it was given, if any)."""

    __slots__ = ("instance", "released", "service")

    def __init__(self, service: Service) -> None:
        self.service = service
        self.instance: Instance | None = None
        self.released = False

    async def acquire(self) -> tuple[Instance, bool]:
        """A ready instance for this connection; waited=True if a start was awaited. Raises Rejected."""
        self.drop()
        inst, waited = await self.service._acquire()
        if self.released:  # the client left while we waited
            self.service._release_instance(inst)
            raise asyncio.CancelledError
        self.instance = inst
        return inst, waited

    def claim(self, inst: Instance) -> bool:
        """Count this connection on an instance it already reaches (a UDP flow its app has just answered); False
        if that instance is going away."""
        self.drop()
        if inst.stopping or self.released:
            return False
        self.service._take(inst)
        self.instance = inst
        return True

    def connected(self) -> None:
        """The app accepted this connection."""
        assert self.instance is not None
        if not self.instance.established:
            self.service._proved(self.instance)
        self.instance.established += 1

    def broken(self, why: str) -> bool:
        """The instance refused this connection past its deadline: it is removed. True if the connection
        should try another instance (this one had worked before: its app died), False if the start itself
        never worked (the service backs off)."""
        inst = self.instance
        assert inst is not None
        self.drop()
        self.service.instance_failed(inst, why)
        return inst.established > 0

    def drop(self) -> None:
        """Give the instance back without blaming it (the connection failed on our side)."""
        if self.instance is not None:
            inst, self.instance = self.instance, None
            self.service._release_instance(inst)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.drop()
        self.service._connection_closed()


class Service:
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
        self.steering: Steering | None = None  # set by the lifecycle owner when the service has a kernel path
        self.instances: list[Instance] = []  # ready to take connections
        self.waiting = 0  # connections waiting in acquire() for an instance
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
        self.dependencies: list[Service] = []
        self.dependants: list[Service] = []
        self._rejections = RejectionTally()
        self._rejections_timer: Timer | None = None
        self._kernel_rejected = self._kernel_steered = self._kernel_amplified = 0
        # Remaining backoff shrinks with time, and kernel-path connections change without us: both are computed
        # at scrape time, not when last touched.
        self.m.open_connections.set_function(lambda: self.open_connections + self.kernel_connections)
        self.m.backoff.set_function(self._backoff_seconds)
        self.m.restore_backoff.set_function(lambda: self.restore_backoff.remaining(self.clock.now()))
        self.m.standby_instances.set_function(lambda: len(self.launcher.standbys))
        self.m.standby_memory.set_function(lambda: sum(i.sandbox.memory_bytes() or 0
                                                       for i in list(self.launcher.standbys)))
        self._publish()

    # --- checkpoint ---------------------------------------------------------------------------------------

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

    @property
    def starting(self) -> int:
        return len(self._starts)

    @property
    def max_instances(self) -> int:
        return scaling.max_instances(configured=self.config.max_instances, stateful=self._single.stateful)

    def _consume(self, checkpoint: Checkpoint) -> bool:
        """A stateful checkpoint is used up by the instance about to start from it (True: this start's)."""
        if not self._single.consume(checkpoint):
            return False
        if self._checkpoint.done() and not self._checkpoint.cancelled() and self._checkpoint.result() is checkpoint:
            self._checkpoint = asyncio.get_running_loop().create_future()
        return True

    def _refresh_if_used_up(self) -> None:
        """Once nothing runs from a used-up checkpoint any more, have it made again (from the volumes as they are
        now); connections meanwhile wait for it, as for a first build (starts for them wait in _start)."""
        if not self._single.refresh_due(running=bool(self.instances or self._releasing), closed=self._closed):
            return
        if self.used_up is not None:
            self.used_up()

    def checkpoint_failed(self, why: str, retry_in: float) -> None:
        """The build failed and the service has no checkpoint: refuse connections until a retry succeeds."""
        if self.checkpoint is not None:
            return  # a failed rebuild: the current checkpoint keeps serving
        self.checkpoint_problem = why
        self.checkpoint_retry_at = self.clock.now() + retry_in
        self._notify()

    def _own(self, task: asyncio.Task[Any]) -> None:
        """A task close() waits for (teardowns, sweeps, slot changes)."""
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

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

    @property
    def checkpoint(self) -> Checkpoint | None:
        """The one new instances start from (a stateful one while its single instance runs from it)."""
        if self._checkpoint.done() and not self._checkpoint.cancelled() and not self._checkpoint.exception():
            return self._checkpoint.result()
        return self._single.consumed

    # --- connections ---------------------------------------------------------------------------------------

    def refusal(self) -> Rejected | None:
        """Why a new connection would be refused now, before any budget is asked (None: it would not be)."""
        return admission.refusal(self.name, closed=self._closed, stopped=self.stopped,
                                 max_connections=self.config.max_connections,
                                 open_connections=self.open_connections + self.kernel_connections)

    def admit(self) -> Lease:
        """Count a new client connection in, or raise Rejected (counted by the caller through reject())."""
        if (why := self.refusal()) is not None:
            raise why
        if not self.budget.take():
            raise Rejected("resources", f"the activator's file descriptor budget ({self.budget.limit} "
                                        "connections) is spent; raise LimitNOFILE")
        self.open_connections += 1
        return Lease(self)

    def _connection_closed(self) -> None:
        self.open_connections -= 1
        self.budget.give()

    @property
    def kernel_counters(self) -> tuple[int, int]:
        """The kernel's rejected and steered counts last folded into the metrics."""
        return self._kernel_rejected, self._kernel_steered

    def take_counters_from(self, old: Service) -> None:
        """A new definition of the same service (a reload): the kernel counters carry on, not start over."""
        self._kernel_rejected, self._kernel_steered = old.kernel_counters
        self._kernel_amplified = old._kernel_amplified

    def kernel_replies_dropped(self, total: int) -> None:
        """The kernel path's count of UDP replies dropped over udp_reply_ratio (a repaired table's starts at 0)."""
        if total > self._kernel_amplified:
            self.m.udp_replies_dropped.inc(total - self._kernel_amplified)
        self._kernel_amplified = total

    @property
    def kernel_connections(self) -> int:
        return sum(i.kernel for i in self.instances)

    def needs_wake(self) -> bool:
        """Would a connection arriving now make the service start an instance (or wait for one)?"""
        best = capacity.least_loaded(self.instances)
        return scaling.needs_wake(None if best is None else best.connections, target=self.config.target_connections,
                                  ready=len(self.instances), starting=len(self._starts),
                                  max_instances=self.max_instances)

    async def _acquire(self) -> tuple[Instance, bool]:
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
        self._take(best)
        return best, waited

    def _take(self, inst: Instance) -> None:
        inst.spliced += 1
        inst.served += 1
        if inst.idle_timer is not None:
            inst.idle_timer.cancel()
            inst.idle_timer = None

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

    def _proved(self, inst: Instance) -> None:
        """The instance's app accepted its first connection: the start really worked."""
        self.start_backoff.succeeded()

    def _release_instance(self, inst: Instance) -> None:
        inst.spliced -= 1
        if inst.stopping:
            return
        then = reaping.released(spliced=inst.spliced, connections=inst.connections,
                                target=self.config.target_connections)
        if then.arm_idle:
            inst.idle_since = self.clock.now()
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

    # --- the kernel path ------------------------------------------------------------------------------------

    def _resteer(self) -> None:
        if self.steering is not None:
            self.steering.set([i for i in self.instances if not i.withdrawn and not i.stopping], len(self._starts))

    def kernel_sample(self, samples: dict[int, Any], rejected: int, steered: int, now: float) -> None:
        """Fold a sample of the kernel path (network.HostNetwork.sample(), by mark) into the instances, and the
        service's counters (connections steered, refused for max_connections) into its metrics."""
        if rejected > self._kernel_rejected:
            self.m.rejected["max-connections"].inc(rejected - self._kernel_rejected)
            self._tally("max-connections", rejected - self._kernel_rejected,
                        f"refused in the kernel: service '{self.name}' has {self.config.max_connections} open "
                        "connections")
        if steered > self._kernel_steered:
            self.m.connections.inc(steered - self._kernel_steered)
        self._kernel_rejected, self._kernel_steered = rejected, steered
        for inst in list(self.instances):
            att = inst.sandbox.attachment
            s = samples.get(att.mark) if att is not None else None
            if s is None:
                continue
            if s.packets != inst.kernel_packets:  # traffic since the last look: the instance is in use
                inst.idle_since = now
                if s.packets > inst.kernel_packets and not inst.established:
                    inst.established = 1
                    self._proved(inst)
            self.m.bytes_in.inc(max(0, s.bytes_in - inst.kernel_bytes_in))
            self.m.bytes_out.inc(max(0, s.bytes_out - inst.kernel_bytes_out))
            inst.kernel, inst.kernel_packets = s.open, s.packets
            inst.kernel_bytes_in, inst.kernel_bytes_out = s.bytes_in, s.bytes_out
            # a counter below the last one was put back from zero (a repaired table): all of it is new
            inst.kernel_served += s.served - inst.kernel_served_seen if s.served >= inst.kernel_served_seen \
                else s.served
            inst.kernel_served_seen = s.served
        self._scale(extra=0)

    @property
    def handoff_address(self) -> tuple[str, int] | None:
        """Where a connection the activator holds reaches an app that accepts from the service's socket."""
        return self.steering.address if self.steering is not None else None

    def handoff_sample(self, sample: HandoffSample, now: float) -> None:
        """Fold a sample of the handed-off connections (handoff.HandoffSteering.sample()) into the instances: an
        instance holding connections is in use; the accept queue is demand no instance has taken yet. An app
        that closed the socket it was handed takes nothing from it any more: the activator accepts again (and
        dials that app on its own address, if it listens there)."""
        for inst in self.instances:
            n = sample.counts.get(inst.name)
            if n is None:
                continue
            if n or n != inst.kernel:
                inst.idle_since = now
            if n and not inst.established:
                inst.established = 1
                self._proved(inst)
            inst.kernel = n
            if inst.name in sample.dropped:
                log.warning("service=%s instance=%s closed the listening socket it was handed; the activator "
                            "accepts for it again", self.name, inst.name)
                inst.handoff = False
        if sample.dropped:
            self._resteer()
        self._scale(extra=sample.backlog)

    def _watch(self, inst: Instance) -> None:
        """Know the moment the app dies (a pidfd becomes readable), so a steered instance leaves the rule at
        once instead of when a client finds its app gone."""
        pid = inst.sandbox.pid_now()
        if pid is None:
            return
        try:
            fd = os.pidfd_open(pid)
        except OSError:
            return
        inst.pidfd = fd
        asyncio.get_running_loop().add_reader(fd, self._died, inst)

    def _unwatch(self, inst: Instance) -> None:
        if inst.pidfd is not None:
            asyncio.get_running_loop().remove_reader(inst.pidfd)
            os.close(inst.pidfd)
            inst.pidfd = None

    def _died(self, inst: Instance) -> None:
        self._unwatch(inst)
        if not inst.stopping:
            self.instance_failed(inst, "its app exited")

    def instance_failed(self, inst: Instance, why: str) -> None:
        """A connection found the instance's app refusing past its connect deadline: take the instance out.

        One that never accepted a connection is a failed start, and the service backs off. One that did and
        then stopped (the app crashed or was killed) is just gone: the next connection gets a new one.
        """
        if inst.stopping:
            return
        self.m.instance_failures.inc()
        if inst.established:
            log.error("service=%s instance=%s removed: %s (after %d connections)", self.name, inst.name, why,
                      inst.established)
            self._stop(inst)
            self._replenish()
            return
        delay = self.start_backoff.failed(self.clock.now())
        self.m.start_failures.inc()
        log.error("service=%s instance=%s removed: %s; new instances back off %.1fs", self.name, inst.name, why, delay)
        self._stop(inst)
        self._schedule_replenish(delay)

    def _notify(self) -> None:
        """Wake every waiter to re-evaluate (one Event per generation, so none misses a wake-up)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _scale(self, extra: int) -> None:
        allowed = scaling.may_start(closed=self._closed, stopped=self.stopped,
                                    backing_off=self.start_backoff.active(self.clock.now()),
                                    checkpoint_problem=self.checkpoint_problem is not None)
        n = scaling.scale_out(allowed=allowed, demand=sum(i.connections for i in self.instances) + self.waiting + extra,
                              ready=len(self.instances), starting=len(self._starts),
                              target=self.config.target_connections, max_instances=self.max_instances)
        for _ in range(n):
            self._spawn_start()

    def _replenish(self) -> None:
        """Keep min_instances warm (after the checkpoint is set, after failures once backoff allows)."""
        self._replenish_timer = None
        plan = scaling.replenish(serving=not (self._closed or self.stopped or self.checkpoint is None),
                                 backoff_remaining=self.start_backoff.remaining(self.clock.now()), floor=self.floor,
                                 ready=len(self.instances), starting=len(self._starts))
        if plan.retry_in is not None:
            self._schedule_replenish(plan.retry_in)
        for _ in range(plan.starts):
            self._spawn_start()

    def _schedule_replenish(self, delay: float) -> None:
        if scaling.retry_armed(floor=self.floor, armed=self._replenish_timer is not None, closed=self._closed):
            self._replenish_timer = self.clock.call_later(delay, self._replenish)

    def _spawn_start(self) -> None:
        task = spawn(self._start(), name=f"start:{self.name}", awaited=True)
        self._starts.add(task)
        task.add_done_callback(self._started)
        if self.steering is not None and self.steering.address is not None:
            self._resteer()  # handoff: the activator stops accepting before the app can (handoff.py)
        self._publish()
        for dep in self.dependencies:  # together, not one after the other: the app asks for them when it needs them
            dep.wanted_by(self)

    # --- group activation (depends_on) ----------------------------------------------------------------------

    def wanted_by(self, dependant: Service) -> None:
        """A dependant is starting an instance: have one too (and so, in turn, our own dependencies)."""
        if self.instances or self._starts:
            return
        log.info("service=%s woken with %s, which depends on it", self.name, dependant.name)
        self._scale(1)

    def held(self) -> list[str]:
        """The dependants that have (or are starting) an instance: while any does, our last one stays."""
        return [d.name for d in self.dependants if d.instances or d._starts]

    def _dependant_idle(self) -> None:
        """A dependant has no instance left: ours that were kept for it are looked at again now (idle long
        enough: reaped with it)."""
        for inst in list(self.instances):
            if inst.idle_timer is not None:
                self._arm_idle(inst, 0)

    def _started(self, task: asyncio.Task[Instance]) -> None:
        self._starts.discard(task)
        try:
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                delay = self.start_backoff.failed(self.clock.now())
                self.m.start_failures.inc()
                log.error("service=%s start failed: %s; no new attempt for %.1fs (failure %d in a row)",
                          self.name, exc, delay, self.start_backoff.failures)
                self._schedule_replenish(delay)
                if not self.instances and not self._starts:
                    for dep in self.dependencies:
                        dep._dependant_idle()
                self._refresh_if_used_up()
                return
            inst = task.result()
            # Not yet a success: a restored app is not checked for listening (it listens by construction); its
            # first accepted connection proves it (_proved), and a deaf one backs the service off as it should.
            if self._closed:
                self._stop(inst)
                return
            self.instances.append(inst)
            self.started_total += 1
            self._watch(inst)
            self._resteer()
            # Nobody may claim it (every waiter gave up): it must still go away when idle. Idle from now, on the
            # service's clock (the launcher stamped it on its own).
            inst.idle_since = self.clock.now()
            self._arm_idle(inst, self.config.idle_timeout)
        finally:
            self._publish()
            self._notify()

    def _publish(self) -> None:
        self.m.instances.set(len(self.instances))
        self.m.starting.set(len(self._starts))

    # --- idle reaping --------------------------------------------------------------------------------------

    def _arm_idle(self, inst: Instance, delay: float) -> None:
        if inst.idle_timer is not None:
            inst.idle_timer.cancel()
        inst.idle_timer = self.clock.call_later(delay, lambda: self._idle_check(inst))
        if self.config.idle_cpu_below is not None:
            cpu = inst.sandbox.cpu_seconds()
            inst.cpu_mark = None if cpu is None else (self.clock.now(), cpu)

    def _cpu_share(self, inst: Instance, now: float) -> float | None:
        """CPU per second its processes used since its idle timer was armed (idle_cpu_below), or None."""
        if self.config.idle_cpu_below is None or inst.cpu_mark is None:
            return None
        return reaping.cpu_share(inst.cpu_mark, inst.sandbox.cpu_seconds(), now)

    @property
    def floor(self) -> int:
        """Instances kept even when idle: min_instances, and one during a keep_alive_schedule window."""
        return scaling.floor(min_instances=self.config.min_instances, kept_warm=self.kept_warm)

    def keep_warm(self, on: bool) -> None:
        """A keep_alive_schedule window began (an instance is started ahead of any client) or ended (idle ones
        are looked at again now, and go once idle for idle_timeout)."""
        if on == self.kept_warm:
            return
        self.kept_warm = on
        self.m.kept_warm.set(int(on))
        log.info("service=%s %s", self.name, "keep_alive_schedule: kept warm from now" if on else
                 "keep_alive_schedule: window over, idle instances go after idle_timeout")
        if on:
            self._replenish()
            return
        for inst in list(self.instances):
            if inst.idle_timer is None and reaping.looked_at_again(spliced=inst.spliced, stopping=inst.stopping,
                                                                   withdrawn=inst.withdrawn):
                self._arm_idle(inst, 0)

    def _idle_check(self, inst: Instance) -> None:
        inst.idle_timer = None
        now = self.clock.now()
        verdict = reaping.idle_check(
            reaping.InstanceView(stopping=inst.stopping, spliced=inst.spliced, withdrawn=inst.withdrawn,
                              kernel=inst.kernel, idle_since=inst.idle_since,
                              steerable=inst.handoff or inst.sandbox.attachment is not None,
                              cpu_share=self._cpu_share(inst, now)),
            now=now, idle_timeout=self.config.idle_timeout, instances=len(self.instances),
            min_instances=self.floor, held_by=self.held(), steered=self.steering is not None,
            cpu_below=self.config.idle_cpu_below)
        if verdict.idle_since is not None:
            inst.idle_since = verdict.idle_since
        if verdict.action is Idle.BUSY_CPU:
            self.m.idle_cpu_busy.inc()
            log.info("service=%s instance=%s no connection for %gs, but its app used more than %g%% of a CPU: "
                     "kept (idle_cpu_below)", self.name, inst.name, self.config.idle_timeout,
                     (self.config.idle_cpu_below or 0) * 100)
        if verdict.action is Idle.KEPT_FOR_DEPENDANT:
            log.debug("service=%s instance=%s idle, kept for %s", self.name, inst.name, ", ".join(self.held()))
        if verdict.action is Idle.REAP:
            self._reap(inst)
        elif verdict.action is Idle.RETIRE:
            inst.withdrawn = True
            if not inst.handoff:  # one accepting from the service's socket leaves the rule once frozen
                self._resteer()
            self._own(spawn(self._retire(inst), name=f"retire:{inst.name}"))
        elif verdict.delay is not None:  # looked at again later (kept: until the last dependant goes, or warm)
            self._arm_idle(inst, verdict.delay)

    async def _retire(self, inst: Instance) -> None:
        """The instance is out of the rule: reap it unless a connection got in before the rule changed.

        A handshake under way when the rule changed (a SYN steered to it just before) must finish here, or the
        client loses its connection; a spoofed SYN never finishes, and goes after half_open_timeout. Half-open
        entries are therefore waited out, not counted: no new one can come, the instance is out of the rule."""
        assert self.steering is not None
        steering = self.steering
        if inst.handoff:
            await self._retire_handed(inst, steering)
            return
        # A SYN DNATed just before the rule changed may not have its conntrack entry confirmed yet (a dump shows
        # confirmed ones only): let it settle, or that client's SYN would meet a dead instance and be retried a
        # second later.
        await self.clock.sleep(reaping.WITHDRAW_SETTLE)
        deadline = reaping.retire_deadline(self.clock.now(), steering.half_open_timeout)
        while True:
            still_open, half_open = await asyncio.to_thread(steering.open_count, inst)
            if inst.stopping:
                return
            reap = reaping.retired(still_open=still_open, half_open=half_open, spliced=inst.spliced,
                                past_deadline=self.clock.now() > deadline)
            if reap is not None:
                break
            await self.clock.sleep(reaping.RECOUNT_EVERY)
        if not reap:
            self._put_back(inst, still_open)
            return
        self._reap(inst)

    async def _retire_handed(self, inst: Instance, steering: Steering) -> None:
        """An instance that accepts from the service's socket (handoff.py): frozen, it takes no new connection and
        its descriptor table cannot change, so the count is exact; killed frozen, or thawed and kept."""
        try:
            await inst.sandbox.freeze()
            self._resteer()  # frozen first: the activator never competes with it for a connection
            still_open, _ = await asyncio.to_thread(steering.open_count, inst)
        except Exception as e:
            log.warning("service=%s instance=%s could not be frozen to be counted (%s); kept", self.name, inst.name, e)
            still_open = 1
        if inst.stopping:
            return
        if still_open or inst.spliced:
            self._put_back(inst, still_open)  # first: the activator stops accepting and the app's flags come back
            inst.sandbox.thaw()
            return
        self._reap(inst)

    def _put_back(self, inst: Instance, still_open: int) -> None:
        inst.withdrawn = False
        inst.kernel = max(inst.kernel, still_open)
        inst.idle_since = self.clock.now()
        self._resteer()
        self._arm_idle(inst, self.config.idle_timeout)

    def _reap(self, inst: Instance) -> None:
        log.info("service=%s instance=%s idle for %gs, reaping (it served %d connection(s): %d through the "
                 "activator, %d steered by the kernel)", self.name, inst.name, self.config.idle_timeout,
                 inst.served + inst.kernel_served, inst.served, inst.kernel_served)
        self.m.idle_reaps.inc()
        self._stop(inst, graceful=not inst.sandbox.frozen)  # a frozen app cannot act on a signal: it is killed

    def _stop(self, inst: Instance, *, graceful: bool = False) -> None:
        """Take the instance out and release it; graceful (a reap, a drain): its app is asked to exit first."""
        inst.stopping = True
        self._unwatch(inst)
        if inst.idle_timer is not None:
            inst.idle_timer.cancel()
            inst.idle_timer = None
        if inst in self.instances:
            self.instances.remove(inst)
        self._resteer()  # before anything is released: no connection is ever steered to a dead instance
        self._publish()
        if not self.instances and not self._starts:
            for dep in self.dependencies:
                dep._dependant_idle()
        self._releasing.add(inst)
        task = spawn(self._teardown(inst, graceful), name=f"teardown:{inst.name}")
        self._own(task)

    async def _teardown(self, inst: Instance, graceful: bool) -> None:
        try:
            if graceful:
                await self._ask_to_exit(inst)
            await inst.sandbox.release()
        finally:
            self._releasing.discard(inst)
            self.sweep_if_unused()
            self._refresh_if_used_up()

    async def _pre_stop(self, inst: Instance) -> None:
        """pre_stop: one HTTP request to the app before its stop signal. What the app answers is untrusted: read
        with a bound (readiness.http_ok), and however it ends, the stop goes on."""
        hook = self.config.pre_stop
        assert hook.http_path is not None
        try:
            ok = await asyncio.wait_for(http_ok(inst.sandbox.connector(self.config.port), self.config.port,
                                                hook.http_path, method=hook.method,
                                                answer_within=hook.timeout + 5), hook.timeout)
            result = "ok" if ok else "failed"
        except TimeoutError:
            result = "timeout"
        self.m.pre_stop[result].inc()
        if result != "ok":
            log.warning("service=%s instance=%s pre_stop %s %s %s; stopping it anyway", self.name, inst.name,
                        hook.method, hook.http_path, f"took longer than its timeout ({hook.timeout:g}s)"
                        if result == "timeout" else "did not answer 2xx/3xx")

    async def _ask_to_exit(self, inst: Instance) -> None:
        if self.config.pre_stop.http_path is not None and not inst.sandbox.frozen:
            await self._pre_stop(inst)
        name = self.config.stop_signal or (inst.checkpoint.stop_signal if inst.checkpoint else "SIGTERM")
        try:
            sig = signal_number(name)
        except ValueError:  # an image's STOPSIGNAL we cannot name (SIGRTMIN+3): what Docker falls back to
            sig = signal.SIGTERM
        try:
            outcome = await inst.sandbox.stop(sig, self.config.stop_grace)
            if outcome == "deaf":  # every reap of such an app: not news
                log.debug("service=%s instance=%s did not exit: its app has no handler for %s; killed at once",
                         self.name, inst.name, signal.Signals(sig).name)
            elif outcome == "timeout":
                log.info("service=%s instance=%s did not exit on %s within %gs: killed", self.name, inst.name,
                         signal.Signals(sig).name, self.config.stop_grace)
        except Exception as e:  # whatever happens, release() kills it
            log.warning("service=%s instance=%s could not be asked to stop: %s", self.name, inst.name, e)

    # --- starting instances ------------------------------------------------------------------------------

    async def _start(self) -> Instance:
        checkpoint = await self._checkpoint
        if not self._consume(checkpoint):
            return await self._start_from(checkpoint)
        try:
            return await self._start_from(checkpoint)
        finally:
            self._single.consuming = False  # its instance is in self.instances now, or there is none

    async def _start_from(self, checkpoint: Checkpoint) -> Instance:
        if self.restore_backoff.active(self.clock.now()):
            if self.config.fallback == "none":
                wait = self.restore_backoff.remaining(self.clock.now())
                raise StartError(f"restores are backing off for {wait:.1f}s")
        else:
            try:
                inst = await self.launcher.restore(checkpoint)
                self.restore_backoff.succeeded()
                return inst
            except RestoreError as e:
                self.m.restore_failures.inc()
                delay = self.restore_backoff.failed(self.clock.now())
                then = "falling back to a cold start" if self.config.fallback == "cold-start" else "no fallback"
                log.error("service=%s instance=%s restore failed: %s (CRIU log: %s); restores back off %.1fs; %s",
                          self.name, e.instance, e, e.log or "not kept", delay, then)
                if self.config.fallback == "none":
                    raise
        inst = await self.launcher.cold_start(checkpoint)
        self.m.cold_starts.inc()
        return inst

    # --- status --------------------------------------------------------------------------------------------

    def status(self) -> dict[str, Any]:
        now, wall = self.clock.now(), time.time()
        ck = self.checkpoint
        return {
            "name": self.name,
            "listen": [str(a) for a in self.config.listen],
            "open_connections": self.open_connections + self.kernel_connections,
            "kernel_path": self.steering is not None,
            "handoff": self.handoff_address is not None,
            "max_connections": self.config.max_connections or self.budget.limit,
            "waiting": self.waiting,
            "starting": len(self._starts),
            "started_total": self.started_total,  # instances brought up (restored or cold-started) since start
            "backoff_seconds": round(self.start_backoff.remaining(now), 3),
            "restore_backoff_seconds": round(self.restore_backoff.remaining(now), 3),
            "min_instances": self.config.min_instances,
            "kept_warm": self.kept_warm,  # by keep_alive_schedule, now
            "max_instances": self.config.max_instances,
            "stopped": self.stopped,
            "depends_on": [d.name for d in self.dependencies],
            "kept_for": self.held(),
            "checkpoint_problem": self.checkpoint_problem,
            "checkpoint_retry_seconds": round(max(0.0, self.checkpoint_retry_at - now), 1)
            if self.checkpoint_problem else 0.0,
            "checkpoint": None if ck is None else {
                "dir": str(ck.dir), "age_seconds": round(wall - ck.created, 1), "pages_bytes": ck.pages_bytes,
                "image_id": ck.origin.image_id,
            },
            "standby": self.launcher.standby,
            "standbys": [
                {"name": i.name, "age_seconds": round(now - i.ready_at, 1), "memory_bytes": i.sandbox.memory_bytes(),
                 "address": str(i.sandbox.attachment.ip) if i.sandbox.attachment else None}
                for i in self.launcher.standbys
            ],
            "instances": [
                {"name": i.name, "how": i.how, "age_seconds": round(now - i.ready_at, 1),
                 "connections": i.connections, "kernel_connections": i.kernel,
                 "served": i.served + i.kernel_served, "served_by_kernel": i.kernel_served,
                 "address": str(i.sandbox.attachment.ip) if i.sandbox.attachment else None,
                 "start_ms": round(i.start_seconds * 1000, 1),
                 "memory_bytes": i.sandbox.memory_bytes(), "cpu_seconds": i.sandbox.cpu_seconds()}
                for i in self.instances
            ],
        }

    # --- shutdown ------------------------------------------------------------------------------------------

    # --- runtime control (activator wake|scale|stop|start, through the control socket) ----------------------

    async def scale_to(self, n: int, timeout: float) -> int:
        """Restore instances now, without a client, until n are up (at most max_instances); they go when idle as
        any other (or stay, up to min_instances). Waits for them; returns how many are up."""
        if self.stopped:
            raise ActivatorError(f"service '{self.name}' is stopped; `activator start {self.name}` first")
        if self.checkpoint is None:
            raise ActivatorError(f"service '{self.name}' has no checkpoint yet"
                                 + (f" ({self.checkpoint_problem})" if self.checkpoint_problem else ""))
        n = min(max(n, 1), self.max_instances)
        for _ in range(n - len(self.instances) - len(self._starts)):
            self._spawn_start()
        if self._starts:
            await asyncio.wait(set(self._starts), timeout=timeout)
        return len(self.instances)

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
                if reaping.looked_at_again(spliced=inst.spliced, stopping=inst.stopping, withdrawn=inst.withdrawn):
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

    async def _cancel_starts(self) -> None:
        starts = list(self._starts)
        for task in starts:
            task.cancel()
        for task in starts:
            with contextlib.suppress(BaseException):
                await task

    def withdraw_all(self) -> None:
        """Stop steering new connections to any instance (shutdown: they drain, then go). An app that accepts from
        the service's socket can only be asked to stop accepting: it is stopped gracefully (its SIGTERM handler
        closes its listener and lets its requests finish)."""
        for inst in self.instances:
            inst.withdrawn = True
        self._resteer()
        for inst in [i for i in self.instances if i.handoff]:
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
