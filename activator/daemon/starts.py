"""A service's starts: restore or cold start (with restore backoff and the fallback), a start's outcome (the
instance joins, or the service backs off), scale-out for demand, the floor kept warm, dependencies woken with it,
and each instance's app watched for its death.

A start (checkpoints/instance.py, through the launcher passed in) is a restore from the checkpoint into a slot
prepared ahead (one CRIU request, bounded by restore_timeout); a restored app listens by construction, and its
first accepted connection proves the start (within connect_timeout). A failed restore falls back to a cold
start from the image unless `fallback: none`, and further restores back off (new instances are cold-started
meanwhile). A start that yields no instance at all backs the whole service off: until it expires, connections
that would need a new instance are closed at once instead of piling up behind another attempt. Each start is its
own task, shielded from the connections waiting on it, so a client that gives up cancels nothing for the others.
How many to start is core/scaling.py's decision.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os

from activator.checkpoints.instance import Instance
from activator.checkpoints.store import Checkpoint
from activator.core import scaling
from activator.core.scaling import Attempt
from activator.errors import ActivatorError, RestoreError, StartError
from activator.tasks import spawn

from .servicestate import ServiceState

log = logging.getLogger("activator.service")


class Starting(ServiceState):
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

    async def _start(self) -> Instance:
        checkpoint = await self._checkpoint
        if not self._consume(checkpoint):
            return await self._start_from(checkpoint)
        try:
            return await self._start_from(checkpoint)
        finally:
            self._single.consuming = False  # its instance is in self.instances now, or there is none

    async def _start_from(self, checkpoint: Checkpoint) -> Instance:
        attempt = scaling.first_attempt(restores_backing_off=self.restore_backoff.active(self.clock.now()),
                                        fallback=self.config.fallback)
        if attempt is Attempt.REFUSE:
            wait = self.restore_backoff.remaining(self.clock.now())
            raise StartError(f"restores are backing off for {wait:.1f}s")
        if attempt is Attempt.RESTORE:
            try:
                inst = await self.launcher.restore(checkpoint)
                self.restore_backoff.succeeded()
                return inst
            except RestoreError as e:
                self.m.restore_failures.inc()
                delay = self.restore_backoff.failed(self.clock.now())
                then = scaling.after_failed_restore(fallback=self.config.fallback)
                log.error("service=%s instance=%s restore failed: %s (CRIU log: %s); restores back off %.1fs; %s",
                          self.name, e.instance, e, e.log or "not kept", delay,
                          "no fallback" if then is Attempt.REFUSE else "falling back to a cold start")
                if then is Attempt.REFUSE:
                    raise
        inst = await self.launcher.cold_start(checkpoint)
        self.m.cold_starts.inc()
        return inst

    def _spawn_start(self) -> None:
        task = spawn(self._start(), name=f"start:{self.name}", awaited=True)
        self._starts.add(task)
        task.add_done_callback(self._started)
        self._resteer()  # a mode may act on a start under way (handoff: the activator stops accepting first)
        self._publish()
        for dep in self.dependencies:  # together, not one after the other: the app asks for them when it needs them
            dep.wanted_by(self)

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
            # first accepted connection proves it (proved()), and a deaf one backs the service off as it should.
            if self._closed:
                self._stop(inst)
                return
            self.instances.append(inst)
            self.started_total += 1
            self._watch(inst)
            self._resteer()
            # Nobody may claim it (every waiter gave up): it must still go away when idle. Idle from now, on the
            # service's clock.
            self._timers(inst).idle_since = self.clock.now()
            self._arm_idle(inst, self.config.idle_timeout)
        finally:
            self._publish()
            self._notify()

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

    def instance_failed(self, inst: Instance, why: str) -> None:
        """A connection found the instance's app refusing past its connect deadline: take the instance out.

        One that never accepted a connection is a failed start, and the service backs off. One that did and
        then stopped (the app crashed or was killed) is just gone: the next connection gets a new one.
        """
        if inst.track.stopping:
            return
        self.m.instance_failures.inc()
        if inst.track.established:
            log.error("service=%s instance=%s removed: %s (after %d connections)", self.name, inst.name, why,
                      inst.track.established)
            self._stop(inst)
            self._replenish()
            return
        delay = self.start_backoff.failed(self.clock.now())
        self.m.start_failures.inc()
        log.error("service=%s instance=%s removed: %s; new instances back off %.1fs", self.name, inst.name, why, delay)
        self._stop(inst)
        self._schedule_replenish(delay)

    def proved(self, inst: Instance) -> None:
        """The instance's app accepted its first connection: the start really worked."""
        self.start_backoff.succeeded()

    def wanted_by(self, dependant: ServiceState) -> None:
        """A dependant is starting an instance: have one too (and so, in turn, our own dependencies)."""
        if self.instances or self._starts:
            return
        log.info("service=%s woken with %s, which depends on it", self.name, dependant.name)
        self._scale(1)

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
        self._timers(inst).pidfd = fd
        asyncio.get_running_loop().add_reader(fd, self._died, inst)

    def _unwatch(self, inst: Instance) -> None:
        timers = self._timers(inst)
        if timers.pidfd is not None:
            asyncio.get_running_loop().remove_reader(timers.pidfd)
            os.close(timers.pidfd)
            timers.pidfd = None

    def _died(self, inst: Instance) -> None:
        self._unwatch(inst)
        if not inst.track.stopping:
            self.instance_failed(inst, "its app exited")

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

    async def _cancel_starts(self) -> None:
        starts = list(self._starts)
        for task in starts:
            task.cancel()
        for task in starts:
            with contextlib.suppress(BaseException):
                await task
