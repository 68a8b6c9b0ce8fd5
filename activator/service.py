"""One service's instances: single-flight restore, connection accounting, idle reap.

acquire() hands a connection a live instance, restoring one when there is none. However many connections arrive
while a restore is under way, they all wait on that same restore (one task, shielded so that a client that
gives up does not cancel it for the others). A failed restore falls back to a cold start from the image, so
clients are still served; the failure is logged with the CRIU log's path and counted.

An instance is reaped when it has had no open connection for idle_timeout. The timer re-checks the instance
when it fires instead of trusting the moment it was armed, and the instance is marked as stopping before any
await, so a connection can never be handed an instance that is being killed (single-threaded event loop).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

from . import readiness
from .checkpoint import Checkpoint
from .config import ServiceConfig
from .errors import ActivatorError, RestoreError, StartError
from .metrics import Metrics
from .runc import Runc
from .sandbox import Sandbox, new_name
from .tasks import spawn

log = logging.getLogger("activator.service")


class State(enum.Enum):
    READY = "ready"
    STOPPING = "stopping"


@dataclass(eq=False)
class Instance:
    sandbox: Sandbox
    how: str  # "restore" or "cold-start"
    start_seconds: float
    state: State = State.READY
    connections: int = 0
    idle_since: float = field(default_factory=time.monotonic)
    idle_timer: asyncio.TimerHandle | None = None

    @property
    def name(self) -> str:
        return self.sandbox.name


class Service:
    def __init__(
        self, config: ServiceConfig, *, runc: Runc, instances_dir: Path, logs_dir: Path, metrics: Metrics,
    ) -> None:
        self.config = config
        self.name = config.name
        self.runc = runc
        self.instances_dir = instances_dir
        self.logs_dir = logs_dir
        self.m = metrics.for_service(self.name)
        self.instances: list[Instance] = []
        self._checkpoint: asyncio.Future[Checkpoint] = asyncio.get_running_loop().create_future()
        self._starting: asyncio.Task[Instance] | None = None
        self._stopping: set[asyncio.Task[None]] = set()
        self._closed = False
        self.m.instances.set(0)

    # --- checkpoint ---------------------------------------------------------------------------------------

    def set_checkpoint(self, checkpoint: Checkpoint) -> None:
        if self._checkpoint.done():
            self._checkpoint = asyncio.get_running_loop().create_future()
        self._checkpoint.set_result(checkpoint)

    def fail_checkpoint(self, exc: BaseException) -> None:
        if not self._checkpoint.done():
            self._checkpoint.set_exception(exc)
            self._checkpoint.exception()  # retrieved here: waiters may not exist

    @property
    def checkpoint(self) -> Checkpoint | None:
        if self._checkpoint.done() and not self._checkpoint.exception():
            return self._checkpoint.result()
        return None

    # --- connections ---------------------------------------------------------------------------------------

    async def acquire(self) -> tuple[Instance, bool]:
        """A ready instance with one more connection counted on it; waited=True if a start was awaited."""
        waited = False
        while True:
            if self._closed:
                raise ActivatorError(f"service '{self.name}' is shutting down")
            inst = self._pick()
            if inst is not None:
                inst.connections += 1
                if inst.idle_timer is not None:
                    inst.idle_timer.cancel()
                    inst.idle_timer = None
                return inst, waited
            waited = True
            if self._starting is None:
                self._starting = spawn(self._start(), name=f"start:{self.name}", awaited=True)
                self._starting.add_done_callback(self._started)
            await asyncio.shield(self._starting)

    def release(self, inst: Instance) -> None:
        inst.connections -= 1
        if inst.connections == 0 and inst.state is State.READY:
            inst.idle_since = time.monotonic()
            self._arm_idle(inst, self.config.idle_timeout)

    def _pick(self) -> Instance | None:
        ready = [i for i in self.instances if i.state is State.READY]
        return min(ready, key=lambda i: i.connections) if ready else None

    def _started(self, task: asyncio.Task[Instance]) -> None:
        self._starting = None
        if task.cancelled() or task.exception() is not None:
            return
        inst = task.result()
        if self._closed:
            self._stop(inst)
            return
        self.instances.append(inst)
        self.m.instances.set(len(self.instances))
        # Nobody may claim it (every waiter gave up): it must still go away when idle.
        self._arm_idle(inst, self.config.idle_timeout)

    # --- idle reaping --------------------------------------------------------------------------------------

    def _arm_idle(self, inst: Instance, delay: float) -> None:
        if inst.idle_timer is not None:
            inst.idle_timer.cancel()
        inst.idle_timer = asyncio.get_running_loop().call_later(delay, self._idle_check, inst)

    def _idle_check(self, inst: Instance) -> None:
        inst.idle_timer = None
        if inst.state is not State.READY or inst.connections > 0:
            return
        remaining = inst.idle_since + self.config.idle_timeout - time.monotonic()
        if remaining > 0.001:
            self._arm_idle(inst, remaining)
            return
        log.info("service=%s instance=%s idle for %.0fs, reaping", self.name, inst.name, self.config.idle_timeout)
        self.m.idle_reaps.inc()
        self._stop(inst)

    def _stop(self, inst: Instance) -> None:
        inst.state = State.STOPPING
        if inst.idle_timer is not None:
            inst.idle_timer.cancel()
            inst.idle_timer = None
        if inst in self.instances:
            self.instances.remove(inst)
        self.m.instances.set(len(self.instances))
        task = spawn(inst.sandbox.release(), name=f"release:{inst.name}")
        self._stopping.add(task)
        task.add_done_callback(self._stopping.discard)

    # --- starting instances ------------------------------------------------------------------------------

    async def _start(self) -> Instance:
        checkpoint = await self._checkpoint
        try:
            return await self._restore(checkpoint)
        except RestoreError as e:
            self.m.restore_failures.inc()
            log.error("service=%s restore failed: %s (CRIU log: %s); falling back to a cold start",
                      self.name, e, e.log or "not kept")
        inst = await self._cold_start(checkpoint)
        self.m.cold_starts.inc()
        return inst

    async def _restore(self, checkpoint: Checkpoint) -> Instance:
        t0 = time.monotonic()
        sb = Sandbox(new_name(self.name), self.instances_dir, self.runc)
        try:
            await sb.prepare(checkpoint.layers, checkpoint.process, self.config.resources, self.name)
            await asyncio.wait_for(sb.restore(checkpoint.images), self.config.restore_timeout)
        except Exception as e:
            kept = sb.keep_log(self.logs_dir, sb.layout.criu_work / "restore.log", sb.layout.runc_log)
            await sb.release()
            why = f"took longer than {self.config.restore_timeout:g}s" if isinstance(e, TimeoutError) else str(e)
            raise RestoreError(why, kept) from e
        except BaseException:
            await sb.release()
            raise
        dt = time.monotonic() - t0
        self.m.restores.inc()
        self.m.restore_duration.observe(dt)
        log.info("service=%s instance=%s restored in %.0f ms", self.name, sb.name, dt * 1000)
        return Instance(sb, "restore", dt)

    async def _cold_start(self, checkpoint: Checkpoint) -> Instance:
        t0 = time.monotonic()
        sb = Sandbox(new_name(self.name), self.instances_dir, self.runc)
        try:
            await sb.prepare([checkpoint.image_rootfs], checkpoint.process, self.config.resources, self.name)
            sb.write_hosts(self.name)
            out = os.open(sb.layout.output, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
            try:
                await sb.start(stdout=out, stderr=out)
            finally:
                os.close(out)
            pid = await sb.pid()
            port = self.config.port
            if pid is None or not await readiness.wait_until(
                lambda: readiness.is_listening(pid, port), timeout=self.config.readiness.timeout, alive=sb.alive,
            ):
                kept = sb.keep_log(self.logs_dir, sb.layout.output)
                raise StartError(
                    f"service '{self.name}': cold start did not listen on port {port}; app output: {kept}"
                )
        except BaseException:
            await sb.release()
            raise
        dt = time.monotonic() - t0
        log.info("service=%s instance=%s cold-started in %.0f ms", self.name, sb.name, dt * 1000)
        return Instance(sb, "cold-start", dt)

    # --- shutdown ------------------------------------------------------------------------------------------

    async def close(self) -> None:
        """Kill every instance and release everything. Idempotent."""
        self._closed = True
        self.fail_checkpoint(ActivatorError(f"service '{self.name}' is shutting down"))
        if self._starting is not None:
            self._starting.cancel()
            with contextlib.suppress(BaseException):
                await self._starting
        for inst in list(self.instances):
            self._stop(inst)
        if self._stopping:
            await asyncio.gather(*self._stopping, return_exceptions=True)
