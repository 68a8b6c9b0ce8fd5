"""One instance: what it is, and how it is brought up (restored from a checkpoint, or cold-started).

Both ways end the same: the app inside is listening on its port (read from /proc, no probe connection), or
everything made for it is released and an error says why, with the logs kept under state_dir/logs.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from activator.config.service import ServiceConfig
from activator.core import pool
from activator.errors import RestoreError, StartError
from activator.net.network import HostNetwork
from activator.runtime import readiness, volumes
from activator.runtime.ksm import Ksm
from activator.runtime.runc import Runc
from activator.runtime.sandbox import Sandbox, new_name
from activator.runtime.volumes import Bind
from activator.statedir import open_private
from activator.tasks import spawn

from . import maphazard
from .restoregate import RestoreGate
from .store import Checkpoint

log = logging.getLogger("activator.instance")

#: the longest a slot to prepare waits for restores under way to finish
SLOT_WAIT = 1.0
#: after a standby is thawed, how long before its replacement is restored
STANDBY_REFILL_DELAY = 0.5
#: a standby's own connection is made within this, or not at all; and used within PRECONNECTED_TTL of the thaw
PRECONNECT_TIMEOUT = 1.0
PRECONNECTED_TTL = 1.0
#: each of a standby's warm-up requests is given this long
WARM_TIMEOUT = 2.0


@dataclass(frozen=True)
class StartPhases:
    """Where a start's time went, in seconds (a restore's three steps; a cold start has only its total)."""

    prepare: float = 0.0  # what was not prepared ahead (a slot used: nearly nothing)
    queue: float = 0.0  # waiting for a restore slot (one per CPU)
    restore: float = 0.0  # the restore call: CRIU (directly, or through runc)

    def as_dict(self) -> dict[str, float]:
        return {"prepare": self.prepare, "queue": self.queue, "restore": self.restore}


class RestoreMetrics(Protocol):
    """What the launcher counts (activator.daemon.metrics.ServiceMetrics is one)."""

    @property
    def restores(self) -> Any: ...

    @property
    def restore_duration(self) -> Any: ...

    @property
    def standby_thaws(self) -> Any: ...


@dataclass
class Tracking:
    """What the daemon tracks of an instance while it serves, apart from what its launcher made of it (Instance):
    its connections on each path, and whether it is leaving. Written by daemon/ only; the pool's decisions
    (core/) read it. The service's own timers for it are daemon/servicestate.Timers."""

    spliced: int = 0  # connections through the activator (held, then spliced in userspace)
    kernel: int = 0  # open connections its steering mode gave it, as of the last sample
    served: int = 0  # connections handed to it through the activator
    kernel_served: int = 0  # connections its steering mode gave it (the kernel's DNAT, or its app's accept)
    established: int = 0  # connections its app accepted (either path)
    stopping: bool = False
    withdrawn: bool = False  # out of its steering mode's set (being counted before a reap)


@dataclass(eq=False)
class Instance:
    sandbox: Sandbox
    how: str  # "restore", "standby" (restored ahead, frozen, thawed for a connection) or "cold-start"
    start_seconds: float
    checkpoint: Checkpoint | None  # the one it was restored from: its diff/ is mounted until release
    ready_at: float = field(default_factory=time.monotonic)
    phases: StartPhases = field(default_factory=StartPhases)
    # A standby's connection to its own app, made while it was frozen (the kernel completes the handshake for a
    # listening socket): the first connection after the thaw takes it instead of connecting (claim_connection).
    preconnected: socket.socket | None = None
    # Its app accepts from the service's own listening socket (handoff): no address of its own to dial, no
    # steering rule; the activator stops accepting while one such instance runs.
    handoff: bool = False
    #: what the daemon tracks of it from here on (the launcher leaves it empty)
    track: Tracking = field(default_factory=lambda: Tracking())

    def claim_connection(self) -> socket.socket | None:
        sock, self.preconnected = self.preconnected, None
        return sock

    def drop_connection(self) -> None:
        if self.preconnected is not None:
            self.preconnected.close()
            self.preconnected = None

    @property
    def name(self) -> str:
        return self.sandbox.name

    @property
    def connections(self) -> int:
        return self.track.spliced + self.track.kernel


class InstanceLauncher:
    """Brings up instances of one service."""

    def __init__(self, config: ServiceConfig, runc: Runc, instances_dir: Path, logs_dir: Path,
                 metrics: RestoreMetrics, network: HostNetwork | None = None, ksm: Ksm | None = None,
                 restores: RestoreGate | None = None) -> None:
        self.config = config
        self.runc = runc
        self.instances_dir = instances_dir
        self.logs_dir = logs_dir
        self.m = metrics
        self.network = network if config.network == "bridge" else None
        self.ksm = ksm  # set when this service's instances share memory
        # Shared by every service (restoregate.py): how many restore at once, and when slots may be prepared.
        self.restores = restores or RestoreGate(1000)
        # Prepared slots: everything but the process (namespace, network, overlay, bundle, cgroups, an idle CRIU),
        # made ahead for the current checkpoint so a restore is one request to CRIU. Refilled after each use.
        self.slots: list[tuple[Checkpoint, Sandbox]] = []
        # Standbys: instances restored ahead and frozen (config.standby of them), thawed by restore(). Like slots,
        # they belong to one checkpoint and are remade behind each one used.
        self.standbys: list[Instance] = []
        self.standby = config.standby  # 0 while the service is stopped (set_standby)
        # handoff: the service's listening socket, handed to every restored app in place of its own
        self.listener: socket.socket | None = None
        self._filling: asyncio.Task[None] | None = None
        self._filling_for: Checkpoint | None = None
        self._refill_after: Checkpoint | None = None  # a refill asked for while one ran
        self._closed = False
        self._hazard_told: set[Path] = set()  # checkpoints whose map_hazard was logged
        self._refill_due: tuple[asyncio.TimerHandle, Checkpoint] | None = None  # a refill due later (_refill_later)

    async def _binds(self, checkpoint: Checkpoint) -> tuple[Bind, ...]:
        if not self.config.volumes:
            return ()
        return await asyncio.to_thread(volumes.ensure, self.config.volumes, self.instances_dir.parent,
                                       checkpoint.image_rootfs, self.config.name, checkpoint.idmap,
                                       (checkpoint.process.uid, checkpoint.process.gid))

    def _sandbox(self, checkpoint: Checkpoint) -> Sandbox:
        sb = Sandbox(new_name(self.config.name), self.instances_dir, self.runc, self.network, self.config.egress,
                     checkpoint.idmap, service=self.config.name)
        sb.mergeable = self.ksm is not None  # before prepare: a direct restore's CRIU is started then
        sb.map_memory = self._maps(checkpoint)
        return sb

    def _maps(self, checkpoint: Checkpoint) -> bool:
        """restore_memory: map, unless the app is known to break under it or CRIU cannot (maphazard.py); the
        operator is told once per checkpoint."""
        maps, why = maphazard.restore_maps(self.config.restore_memory, checkpoint.map_hazard, self.runc.criu_maps)
        if why and checkpoint.dir not in self._hazard_told:
            self._hazard_told.add(checkpoint.dir)
            log.warning("service=%s %s", self.config.name, why)
        return maps

    async def _prepare_for(self, sb: Sandbox, checkpoint: Checkpoint) -> None:
        await sb.prepare(checkpoint.layers, checkpoint.process, self.config.resources,
                         self.config.hostname or self.config.name,
                         checkpoint.seccomp, restore=checkpoint, binds=await self._binds(checkpoint),
                         handoff=(self.config.port, self.listener) if self.listener is not None else None)

    async def _prepared(self, checkpoint: Checkpoint) -> Sandbox:
        """A slot made ahead for this checkpoint, or one made now."""
        for i, (ck, sb) in enumerate(self.slots):
            if ck is checkpoint:
                del self.slots[i]
                sb.unmark_slot()
                return sb
        sb = self._sandbox(checkpoint)
        await self._prepare_for(sb, checkpoint)
        return sb

    def refill(self, checkpoint: Checkpoint) -> None:
        """Keep `standby` frozen instances and config.prepared_slots slots ready for this checkpoint."""
        if self._closed:
            return
        if self._filling is not None and not self._filling.done():
            # The running fill may have looked at `standby` before it changed (a stop, then a start, while it
            # prepared a slot): fill again once it is done, or the standbys would never come back.
            self._refill_after = checkpoint
            return
        self._filling_for = checkpoint
        self._filling = spawn(self._fill(checkpoint), name=f"prepare-slots:{self.config.name}")
        self._filling.add_done_callback(self._filled)

    def _refill_later(self, checkpoint: Checkpoint, delay: float) -> None:
        """refill(checkpoint) in `delay` seconds, unless a reload replaces the checkpoint first (drop_slots_except)
        or the launcher closes: fired after either, it would make slots and standbys of a checkpoint that is gone."""
        if self._refill_due is not None:
            self._refill_due[0].cancel()
        self._refill_due = (asyncio.get_running_loop().call_later(delay, self._refill_now, checkpoint), checkpoint)

    def _refill_now(self, checkpoint: Checkpoint) -> None:
        self._refill_due = None
        self.refill(checkpoint)

    def _filled(self, task: asyncio.Task[None]) -> None:
        again, self._refill_after = self._refill_after, None
        if again is not None and not task.cancelled():
            self.refill(again)

    async def reshare(self, ksm: Ksm | None) -> None:
        """Share memory (or not) from the next instance on; slots made ahead with the other choice are remade."""
        if (ksm is None) == (self.ksm is None):
            return
        self.ksm = ksm
        await self._drop_prepared()
        if self._filling_for is not None:
            self.refill(self._filling_for)

    async def rehand(self, listener: socket.socket | None) -> None:
        """handoff: restores get this socket from now on (None: none, their apps listen on their own); the slots
        and standbys made with the old one (an idle CRIU holds it, a standby's app has it) are released, and made
        again with the new one when there is one."""
        self.listener = listener
        await self._drop_prepared()
        if listener is not None and self._filling_for is not None:
            self.refill(self._filling_for)

    async def _drop_prepared(self) -> None:
        """Stop the fill under way and release every prepared slot and standby (made with what just changed)."""
        if self._filling is not None and not self._filling.done():
            self._filling.cancel()
            await asyncio.wait([self._filling])
        stale, self.slots = self.slots, []
        for _, sb in stale:
            await sb.release()
        await self._drop_standbys(lambda inst: True)

    async def drop_slots_except(self, checkpoint: Checkpoint) -> None:
        """Release slots made for another (replaced) checkpoint: their overlays use its diff/. One still being
        made for it is stopped first, or it would be added after this."""
        if self._filling is not None and not self._filling.done() and self._filling_for is not checkpoint:
            self._filling.cancel()
            await asyncio.wait([self._filling])
        if self._refill_due is not None and self._refill_due[1] is not checkpoint:
            # due after a restore of the replaced checkpoint: it would make slots and standbys of that one again
            self._refill_due[0].cancel()
            self._refill_due = None
        stale = [sb for ck, sb in self.slots if ck is not checkpoint]
        self.slots = [(ck, sb) for ck, sb in self.slots if ck is checkpoint]
        for sb in stale:
            await sb.release()
        await self._drop_standbys(lambda inst: inst.checkpoint is not checkpoint)

    async def set_standby(self, n: int, checkpoint: Checkpoint | None) -> None:
        """Keep n standbys from now on (0 while the service is stopped: none is kept), made for checkpoint."""
        self.standby = n
        extra = set(self.standbys[n:])
        await self._drop_standbys(lambda inst: inst in extra)
        if checkpoint is not None:
            self.refill(checkpoint)

    async def _drop_standbys(self, which: Callable[[Instance], bool]) -> None:
        for inst in [i for i in self.standbys if which(i)]:
            self.standbys.remove(inst)
            inst.drop_connection()
            await inst.sandbox.release()

    async def _fill(self, checkpoint: Checkpoint) -> None:
        # Standbys first: they are what the next connection would use. A stateful checkpoint has none (it serves
        # one instance, then is made again), and a failed one is not retried until the next refill.
        while not self._closed and len(self.standbys) < self.standby \
                and not pool.stateful(self.config.stateful, bool(checkpoint.writes_volumes)):
            try:
                inst = await self._restore_standby(checkpoint)
            except RestoreError as e:
                log.warning("service=%s could not restore a standby: %s (CRIU log: %s)", self.config.name, e,
                            e.log or "not kept")
                break
            if self._closed or len(self.standbys) >= self.standby:  # stopped or closed meanwhile
                inst.drop_connection()
                await inst.sandbox.release()
                break
            self.standbys.append(inst)
        while not self._closed and len(self.slots) < self.config.prepared_slots:
            await self.restores.quiet(SLOT_WAIT)  # a restore under way anywhere goes first
            if self._closed:
                return
            sb = self._sandbox(checkpoint)
            sb.slot = True
            try:
                await self._prepare_for(sb, checkpoint)
            except Exception as e:  # a slot is an optimisation: the next restore prepares its own
                log.warning("service=%s could not prepare a slot: %s", self.config.name, e)
                return
            if self._closed:
                await sb.release()
                return
            self.slots.append((checkpoint, sb))

    async def close(self) -> None:
        """Release every prepared slot (shutdown)."""
        self._closed = True
        if self._refill_due is not None:
            self._refill_due[0].cancel()
            self._refill_due = None
        if self._filling is not None and not self._filling.done():
            self._filling.cancel()
            with contextlib.suppress(BaseException):
                await self._filling
        slots, self.slots = self.slots, []
        for _, sb in slots:
            await sb.release()
        await self._drop_standbys(lambda inst: True)

    def _thaw_standby(self, checkpoint: Checkpoint) -> Instance | None:
        """A standby of this checkpoint, running again: no await between taking it and handing it over."""
        while self.standbys:
            inst = next((i for i in self.standbys if i.checkpoint is checkpoint), None)
            if inst is None:
                return None
            self.standbys.remove(inst)
            t0 = time.monotonic()
            try:
                if inst.sandbox.pid_now() is None:
                    raise OSError("its app is gone")
                inst.sandbox.thaw()
            except OSError as e:
                log.warning("service=%s standby %s unusable (%s); restoring instead", self.config.name, inst.name, e)
                inst.drop_connection()
                spawn(inst.sandbox.release(), name=f"release:{inst.name}")
                continue
            now = time.monotonic()
            inst.how, inst.start_seconds, inst.ready_at = "standby", now - t0, now
            inst.phases = StartPhases(restore=now - t0)
            self.m.standby_thaws.inc()
            # Not at once: a restore (CRIU, and the next slot's mounts and namespace) would take the CPUs the
            # thawed app needs to answer the connections waiting for it.
            self._refill_later(checkpoint, STANDBY_REFILL_DELAY)
            log.info("service=%s instance=%s thawed from standby in %.2f ms", self.config.name, inst.name,
                     (now - t0) * 1000)
            # Unclaimed (a start without a client: `activator scale`), it would pin an idle connection in the app.
            asyncio.get_running_loop().call_later(PRECONNECTED_TTL, inst.drop_connection)
            return inst
        return None

    async def _restore_standby(self, checkpoint: Checkpoint) -> Instance:
        inst = await self._restore(checkpoint, standby=True)
        try:
            await self._warm(inst)
            await inst.sandbox.freeze()
            inst.preconnected = await self._preconnect(inst)
        except BaseException as e:
            inst.drop_connection()
            await inst.sandbox.release()
            if isinstance(e, Exception):
                raise RestoreError(f"freezing it failed: {e}", None, inst.name) from e
            raise
        return inst

    async def _warm(self, inst: Instance) -> None:
        """One round of the service's warm-up requests (or its readiness GET) before the standby is frozen: an
        app's first request after a restore is slower than the next (Tomcat: ~2 ms), and is paid here instead of
        by the first client. Failures are not fatal: a warm-up is an optimisation."""
        c = self.config
        paths = c.warmup.http_paths or ((c.readiness.http_path,) if c.readiness.http_path else ())
        connect = inst.sandbox.connector(c.port)
        with contextlib.suppress(OSError, TimeoutError):
            for path in paths:
                await asyncio.wait_for(readiness.http_ok(connect, c.port, path), WARM_TIMEOUT)
            if c.warmup.payload is not None:
                await asyncio.wait_for(readiness.exchange(connect, c.warmup.payload.encode()), WARM_TIMEOUT)

    async def _preconnect(self, inst: Instance) -> socket.socket | None:
        """A connection to the frozen app's port, established by the kernel (it sits in the app's accept queue
        until the thaw); None if it cannot be made at once (an app that does not listen on 127.0.0.1 inside):
        the first client then connects as usual."""
        sock = inst.sandbox.netns.socket()
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", self.config.port)),
                                   PRECONNECT_TIMEOUT)
        except (OSError, TimeoutError):
            sock.close()
            return None
        except BaseException:
            sock.close()
            raise
        return sock

    async def restore(self, checkpoint: Checkpoint) -> Instance:
        return self._thaw_standby(checkpoint) or await self._restore(checkpoint)

    async def _restore(self, checkpoint: Checkpoint, *, standby: bool = False) -> Instance:
        t0 = time.monotonic()
        sb: Sandbox | None = None
        try:
            sb = await self._prepared(checkpoint)
            if self.ksm is not None:
                self.ksm.started_instance()
            if not standby:  # a standby's app touches nothing before it is thawed
                self._mark_used(checkpoint)
            t1 = time.monotonic()
            async with self.restores.turn():
                tq = time.monotonic()  # the queue is not the restore's (restore_timeout starts here too)
                await asyncio.wait_for(sb.restore(checkpoint.images), self.config.restore_timeout)
            # No listening check here: CRIU restores the app's listening socket itself (the dump was checked for
            # it at build time), and reading /proc/PID/net/tcp costs milliseconds (the kernel walks every socket
            # of the host to print it). The first connection's connect, retried until connect_timeout, is the
            # check: an app that does not accept in time is removed and the service backs off (service.py).
        except Exception as e:
            if not standby:
                self.refill(checkpoint)
            if sb is None:
                raise RestoreError(f"preparing the instance failed: {e}", None, self.config.name) from e
            kept = sb.keep_log(self.logs_dir, sb.layout.criu_work / "restore.log", sb.layout.runc_log,
                               sb.layout.output)
            await sb.release()
            why = f"took longer than restore_timeout ({self.config.restore_timeout:g}s)" \
                if isinstance(e, TimeoutError) else str(e)
            raise RestoreError(why, kept, sb.name) from e
        except BaseException:
            if sb is not None:
                await sb.release()
            raise
        dt = time.monotonic() - t0
        # Not during the restore: preparing the next slot is Python work in a thread, under the GIL. Preparing it
        # 50 ms later instead gained nothing a client's first byte shows (docs/benchmarks.md).
        if not standby:
            self.refill(checkpoint)
        self.m.restores.inc()
        self.m.restore_duration.observe(dt)
        log.info("service=%s instance=%s restored%s in %.0f ms (prepare %.0f, queue %.0f, restore %.0f)",
                 self.config.name, sb.name, " as a standby" if standby else "", dt * 1000, (t1 - t0) * 1000,
                 (tq - t1) * 1000, (t0 + dt - tq) * 1000)
        if self.listener is not None and not sb.handed:
            log.warning("service=%s instance=%s: its app did not take the service's listening socket (a CRIU "
                        "without activator's patch 0002?); served through the activator instead",
                        self.config.name, sb.name)
        return Instance(sb, "restore", dt, checkpoint, handoff=sb.handed,
                        phases=StartPhases(prepare=t1 - t0, queue=tq - t1, restore=t0 + dt - tq))

    async def _wait_listening(self, sb: Sandbox, timeout: float, knob: str) -> None:
        port = self.config.port
        problem = await sb.wait_listening(port, timeout, udp="tcp" not in self.config.protocol)
        if problem is not None:
            state = "exited" if problem == "exited" else f"was not listening on port {port} within {timeout:g}s"
            raise StartError(f"service '{self.config.name}': the app {state} ({knob})")

    def _mark_used(self, checkpoint: Checkpoint) -> None:
        """Before the app may touch its volumes: a stateful checkpoint is made again after this instance, also
        after a crash of the daemon (one small write, for stateful services only)."""
        if pool.stateful(self.config.stateful, bool(checkpoint.writes_volumes)):
            checkpoint.mark_used()

    async def cold_start(self, checkpoint: Checkpoint) -> Instance:
        t0 = time.monotonic()
        self._mark_used(checkpoint)
        sb = self._sandbox(checkpoint)
        if self.ksm is not None:
            self.ksm.started_instance()
        try:
            hostname = self.config.hostname or self.config.name
            await sb.prepare([checkpoint.image_rootfs], checkpoint.process, self.config.resources, hostname,
                             checkpoint.seccomp, binds=await self._binds(checkpoint))
            sb.write_etc(hostname, self.config.extra_hosts, self.config.depends_on)
            out = open_private(sb.layout.output)
            try:
                await sb.start(stdout=out, stderr=out)
            finally:
                os.close(out)
            try:
                await self._wait_listening(sb, self.config.readiness.timeout, "readiness.timeout")
            except StartError as e:
                kept = sb.keep_log(self.logs_dir, sb.layout.output)
                raise StartError(f"{e} after a cold start; app output: {kept}") from None
        except BaseException:
            await sb.release()
            raise
        dt = time.monotonic() - t0
        log.info("service=%s instance=%s cold-started in %.0f ms", self.config.name, sb.name, dt * 1000)
        return Instance(sb, "cold-start", dt, None)

