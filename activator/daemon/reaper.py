"""A service's idle instances: the idle timer (armed on a connection's end, re-checked when it fires), what the
verdict says (core/reaping.py: reap, retire from the kernel path first, keep), and the teardown that follows.

An instance is reaped when it has had no open connection on either path for idle_timeout, unless that would
leave fewer than min_instances. The timer re-checks the instance when it fires instead of trusting the moment it
was armed. A steered instance is first withdrawn from the rule, then its kernel connections are counted afresh:
one that slipped in before the rule changed puts it back. An instance is taken out of the pool before any
await, so a connection can never be handed an instance that is being killed (single-threaded event loop).
"""

from __future__ import annotations

import asyncio
import logging
import signal

from activator.checkpoints.instance import Instance
from activator.config.service import signal_number
from activator.core import reaping
from activator.core.reaping import Idle
from activator.runtime.readiness import http_ok
from activator.tasks import spawn

from .servicestate import ServiceState

log = logging.getLogger("activator.service")


class Reaping(ServiceState):
    def _arm_idle(self, inst: Instance, delay: float) -> None:
        timers = self._timers(inst)
        if timers.idle_timer is not None:
            timers.idle_timer.cancel()
        timers.idle_timer = self.clock.call_later(delay, lambda: self._idle_check(inst))
        if self.config.idle_cpu_below is not None:
            cpu = inst.sandbox.cpu_seconds()
            timers.cpu_mark = None if cpu is None else (self.clock.now(), cpu)

    def _cpu_share(self, inst: Instance, now: float) -> float | None:
        """CPU per second its processes used since its idle timer was armed (idle_cpu_below), or None."""
        mark = self._timers(inst).cpu_mark
        if self.config.idle_cpu_below is None or mark is None:
            return None
        return reaping.cpu_share(mark, inst.sandbox.cpu_seconds(), now)

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
            if self._timers(inst).idle_timer is None and reaping.looked_at_again(
                    spliced=inst.track.spliced, stopping=inst.track.stopping, withdrawn=inst.track.withdrawn):
                self._arm_idle(inst, 0)

    def _dependant_idle(self) -> None:
        """A dependant has no instance left: ours that were kept for it are looked at again now (idle long
        enough: reaped with it)."""
        for inst in list(self.instances):
            if self._timers(inst).idle_timer is not None:
                self._arm_idle(inst, 0)

    def _idle_check(self, inst: Instance) -> None:
        timers = self._timers(inst)
        timers.idle_timer = None
        now = self.clock.now()
        verdict = reaping.idle_check(
            reaping.InstanceView(stopping=inst.track.stopping, spliced=inst.track.spliced,
                                 withdrawn=inst.track.withdrawn, kernel=inst.track.kernel, idle_since=timers.idle_since,
                                 steerable=self.mode.reaches(inst),
                                 cpu_share=self._cpu_share(inst, now)),
            now=now, idle_timeout=self.config.idle_timeout, instances=len(self.instances),
            min_instances=self.floor, held_by=self.held(), steered=self.mode.steers,
            cpu_below=self.config.idle_cpu_below)
        if verdict.idle_since is not None:
            timers.idle_since = verdict.idle_since
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
            inst.track.withdrawn = True
            self._own(spawn(self._retire(inst), name=f"retire:{inst.name}"))
        elif verdict.delay is not None:  # looked at again later (kept: until the last dependant goes, or warm)
            self._arm_idle(inst, verdict.delay)

    async def _retire(self, inst: Instance) -> None:
        """The instance is withdrawn: its mode takes it out and counts what it still has open (steering.Mode.retire);
        reaped with none open, else put back (thawed, if the count froze it)."""
        still_open = await self.mode.retire(inst, self.clock, self._resteer)
        if inst.track.stopping:
            return
        if still_open or inst.track.spliced:
            self._put_back(inst, still_open)  # first: with handoff, the activator stops accepting before the thaw
            if inst.sandbox.frozen:
                inst.sandbox.thaw()
            return
        self._reap(inst)

    def _put_back(self, inst: Instance, still_open: int) -> None:
        inst.track.withdrawn = False
        inst.track.kernel = max(inst.track.kernel, still_open)
        self._timers(inst).idle_since = self.clock.now()
        self._resteer()
        self._arm_idle(inst, self.config.idle_timeout)

    def _reap(self, inst: Instance) -> None:
        t = inst.track
        log.info("service=%s instance=%s idle for %gs, reaping (it served %d connection(s): %d through the "
                 "activator, %d given by its %s mode)", self.name, inst.name, self.config.idle_timeout,
                 t.served + t.kernel_served, t.served, t.kernel_served, self.mode.name)
        self.m.idle_reaps.inc()
        self._stop(inst, graceful=not inst.sandbox.frozen)  # a frozen app cannot act on a signal: it is killed

    def _stop(self, inst: Instance, *, graceful: bool = False) -> None:
        """Take the instance out and release it; graceful (a reap, a drain): its app is asked to exit first."""
        inst.track.stopping = True
        self._unwatch(inst)
        self._cancel_idle(inst)
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
            self._timers_of.pop(inst, None)
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
