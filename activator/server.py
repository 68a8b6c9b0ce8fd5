"""The one lifecycle owner.

serve() = startup() -> wait for a stop request -> shutdown(), and shutdown runs whatever startup got to.

startup:  check the host, lock the state dir, clean what a crashed run left, take the listening sockets
          systemd passed in (LISTEN_FDS, matched by address) and bind the rest (a port in use fails here, before
          anything else starts), start accepting (early connections simply wait), start the control socket
          and the metrics endpoint, then make sure every service has a current checkpoint. Only then is
          systemd told READY=1; from then on a watchdog ping is sent from the event loop itself, so a
          stuck loop is noticed.
shutdown: stop accepting, let open connections finish up to drain_timeout (systemd is told to extend its stop
          timeout accordingly), abort the rest, kill and release every instance, stop the endpoints, unlock.

Signal handlers only set the stop event.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from . import preflight, systemd
from .checkpoint import CheckpointBuilder, CheckpointStore
from .config import Config, ListenAddress, ServiceConfig, Settings
from .control import ControlServer
from .errors import ActivatorError
from .images import DockerImageSource
from .metrics import Metrics
from .proxy import Connection, client_protocol_factory
from .runc import Runc
from .sandbox import Sandbox
from .service import Service
from .tasks import spawn

log = logging.getLogger("activator")


class StateDir:
    """state_dir and the lock that keeps two activators off it."""

    def __init__(self, settings: Settings) -> None:
        root = settings.state_dir
        self.root = root
        self.runc_binary = settings.runc
        self.control_socket = settings.control_socket
        self.instances = root / "instances"
        self.logs = root / "logs"
        self.runc_root = root / "runc"
        self._lock_fd: int | None = None

    def lock(self) -> None:
        for d in (self.root, self.instances, self.logs, self.runc_root):
            d.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ActivatorError(
                f"another activator is already using state_dir {self.root}; stop it or set settings.state_dir"
            ) from None
        self._lock_fd = fd

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def tools(self) -> tuple[Runc, CheckpointStore]:
        runc = Runc(self.runc_root, self.runc_binary)
        runc.write_criu_config()
        return runc, CheckpointStore(self.root)


def open_host(state: StateDir) -> tuple[Runc, CheckpointBuilder]:
    """Check the host, lock the state dir, and make the tools `run` and `checkpoint` share."""
    preflight.check_root()
    runc_version = preflight.check_runc(state.runc_binary)
    criu_version = preflight.check_criu()
    state.lock()
    runc, store = state.tools()
    return runc, CheckpointBuilder(store, DockerImageSource(), runc, state.instances, criu_version, runc_version)


async def clean_leftovers(state: StateDir, runc: Runc) -> list[str]:
    """Remove every container, mount, namespace, cgroup and directory a previous run of this state dir left.

    Every instance a dead run knew of has a directory under instances/ or runc/ (one whose restore runc never
    finished has only the latter); each is released the way a live instance is (Sandbox.release).
    """
    containers = await runc.list()
    for name in containers:
        await runc.delete(name)
    names = {d.name for root in (state.instances, state.runc_root) if root.is_dir() for d in root.iterdir()
             if d.is_dir()}
    for name in sorted(names):
        await Sandbox(name, state.instances, runc).release()
    # Replaced checkpoints were kept only for instances that had them mounted; none survive a restart.
    retired = CheckpointStore(state.root).sweep_retired()
    return [f"container {n}" for n in containers] + [f"instance {n}" for n in sorted(names - set(containers))] \
        + [f"replaced checkpoint {d}" for d in retired]


def bind_listener(addr: ListenAddress, svc: ServiceConfig, config_path: Path) -> socket.socket:
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((addr.host, addr.port))
        sock.listen(1024)
    except OSError as e:
        sock.close()
        why = {
            errno.EADDRINUSE: "is already in use by another process; stop it or pick another port",
            errno.EADDRNOTAVAIL: "is not an address of this host; fix the host part",
            errno.EACCES: "needs more privileges",
        }.get(e.errno or 0, e.strerror or str(e))
        raise ActivatorError(f"{config_path}: services.{svc.name}.listen: {addr} {why}") from None
    sock.setblocking(False)
    return sock


class Activator:
    def __init__(self, config: Config, *, on_ready: Callable[[Activator], None] | None = None) -> None:
        self.config = config
        self.state = StateDir(config.settings)
        self.metrics = Metrics()
        self.services: dict[str, Service] = {}
        self.connections: set[Connection] = set()
        self.listeners: list[tuple[ServiceConfig, socket.socket]] = []
        self._servers: list[asyncio.Server] = []
        self._metrics_server: Any = None
        self._control: ControlServer | None = None
        self._builder: CheckpointBuilder | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self.started = time.time()
        self._stop = asyncio.Event()
        self._on_ready = on_ready
        self.ready = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        try:
            await self.startup()
            if not self._stop.is_set():
                self.ready.set()
                if self._on_ready:
                    self._on_ready(self)
                summary = ", ".join(
                    f"{svc.name} on {' '.join(str(a) for a in svc.listen)}" for svc in self.config.services)
                log.info("ready: %s", summary)
                systemd.notify("READY=1", f"STATUS=serving {len(self.services)} service(s)")
                interval = systemd.watchdog_interval()
                if interval:
                    self._watchdog = spawn(self._ping_watchdog(interval), name="watchdog")
            await self._stop.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    async def startup(self) -> None:
        runc, builder = open_host(self.state)
        cleaned = await clean_leftovers(self.state, runc)
        if cleaned:
            log.warning("cleaned up after a previous run: %s", ", ".join(cleaned))

        self._bind_all(systemd.listen_fds())

        for svc in self.config.services:
            self.services[svc.name] = Service(
                svc, runc=runc, store=builder.store, instances_dir=self.state.instances, logs_dir=self.state.logs,
                metrics=self.metrics,
            )
        loop = asyncio.get_running_loop()
        for svc, sock in self.listeners:
            factory = client_protocol_factory(self.services[svc.name], self.connections)
            self._servers.append(await loop.create_server(factory, sock=sock, backlog=1024))

        self._builder = builder
        self._control = ControlServer(self.state.control_socket, {"status": self.status, "rebuild": self.rebuild})
        await self._control.start()

        if self.config.settings.metrics is not None:
            try:
                self._metrics_server = self.metrics.serve(self.config.settings.metrics)
            except OSError as e:
                raise ActivatorError(
                    f"{self.config.path}: settings.metrics: cannot listen on {self.config.settings.metrics}: "
                    f"{e.strerror}; pick another address or set it to null"
                ) from None

        systemd.notify("STATUS=making sure every service has a current checkpoint")
        results = await asyncio.gather(
            *(self._ensure_checkpoint(builder, s) for s in self.config.services), return_exceptions=True,
        )
        for r in results:
            if isinstance(r, BaseException):
                raise r

    def _bind_all(self, inherited: list[socket.socket]) -> None:
        """Every listen address gets a socket: the one systemd passed for it if any, else one bound here."""
        for svc in self.config.services:
            for addr in svc.listen:
                match = next((s for s in inherited if systemd.same_address(s, addr)), None)
                if match is not None:
                    inherited.remove(match)
                    match.setblocking(False)
                    log.info("service=%s using the socket passed in for %s", svc.name, addr)
                    self.listeners.append((svc, match))
                else:
                    self.listeners.append((svc, bind_listener(addr, svc, self.config.path)))
        for sock in inherited:
            where = sock.getsockname()
            sock.close()
            raise ActivatorError(
                f"{self.config.path}: a socket passed in by systemd ({where}) matches no service's listen address; "
                "add it to a service or remove it from the socket unit"
            )

    async def _ping_watchdog(self, interval: float) -> None:
        while True:
            systemd.notify("WATCHDOG=1")
            await asyncio.sleep(interval / 3)

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "config": str(self.config.path),
            "uptime_seconds": round(time.time() - self.started, 1),
            "ready": self.ready.is_set(),
            "services": [s.status() for s in self.services.values()],
        }

    async def rebuild(self, name: str = "") -> dict[str, Any]:
        """Build a fresh checkpoint for one service and switch new instances to it; running ones carry on."""
        svc = self.config.service(name)
        assert self._builder is not None
        ck, _ = await self._builder.ensure(svc, rebuild=True)
        self.services[svc.name].set_checkpoint(ck)
        log.info("service=%s checkpoint rebuilt in %.1fs on request", svc.name, ck.build_seconds)
        return {"service": svc.name, "dir": str(ck.dir), "build_seconds": ck.build_seconds,
                "listening_ports": list(ck.listening_ports), "pages_bytes": ck.pages_bytes}

    async def _ensure_checkpoint(self, builder: CheckpointBuilder, svc: ServiceConfig) -> None:
        t0 = time.monotonic()
        try:
            checkpoint, built = await builder.ensure(svc)
        except BaseException as e:
            self.services[svc.name].fail_checkpoint(e)
            raise
        if built:
            m = self.services[svc.name].m
            m.checkpoint_builds.inc()
            m.checkpoint_build_duration.observe(time.monotonic() - t0)
            log.info("service=%s checkpoint built in %.1fs (%d MiB of pages)", svc.name,
                     checkpoint.build_seconds, checkpoint.pages_bytes // 2**20)
        self.services[svc.name].set_checkpoint(checkpoint)

    async def shutdown(self) -> None:
        drain = self.config.settings.drain_timeout
        # Never let systemd's stop timeout cut the drain short: ask for the drain plus room to release.
        systemd.notify("STOPPING=1", f"EXTEND_TIMEOUT_USEC={int((drain + 30) * 1e6)}",
                       f"STATUS=draining {len(self.connections)} connection(s)")
        for server in self._servers:
            server.close()
        for _svc, sock in self.listeners:
            sock.close()
        if self.connections:
            log.info("draining %d connection(s) for up to %gs", len(self.connections), drain)
            deadline = time.monotonic() + self.config.settings.drain_timeout
            while self.connections and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            for conn in list(self.connections):
                conn.abort()
        await asyncio.gather(*(s.close() for s in self.services.values()), return_exceptions=True)
        if self._watchdog is not None:
            self._watchdog.cancel()
        if self._control is not None:
            await self._control.close()
        if self._metrics_server is not None:
            self._metrics_server.shutdown()
            self._metrics_server.server_close()
        self.state.unlock()
        log.info("stopped")
