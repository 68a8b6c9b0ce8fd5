"""The one lifecycle owner.

serve() = startup() raced against the stop trigger -> wait for a stop request -> shutdown(); shutdown releases
whatever startup got to, so a SIGTERM during a long first checkpoint build stops promptly and leaves nothing.

startup:  check the host, lock the state dir, raise the descriptor limit and size the connection budget from it,
          clean what a crashed run left, take the listening sockets handed in (LISTEN_FDS, or a caller's) and
          bind the rest (a port in use fails here, before anything else starts), start accepting (early
          connections simply wait), start the control socket and the metrics endpoint, then make sure every
          service has a current checkpoint. Services are independent: serve() tells systemd READY=1 once the
          current checkpoints are loaded (a second at most), while checkpoints still being built go on in the
          background; each service says when it serves ("service=X serving on ADDR") or why not ("not serving:
          no checkpoint (why)"), and one whose build failed refuses its connections (counted; an HTTP 503 with
          `refuse_with: http-503`) while its build is retried with backoff. A watchdog ping is sent from the event
          loop itself. (startup() alone, as tests call it, waits for every first build.)
shutdown: stop accepting, let open connections finish up to drain_timeout (systemd is told to extend its stop
          timeout accordingly; a second SIGTERM/SIGINT cuts the drain short), abort the rest, kill and release
          every instance, stop the endpoints, unlock.

reload:   (SIGHUP, `systemctl reload`, `activator reload`) re-read the file and carry out plan_reload(): new
          listeners are bound first (a port in use refuses the whole reload, nothing changed), removed services
          stop accepting and drain, added ones start as at startup, changed ones get their new checkpoint while
          the old definition keeps serving, then take over the listeners; the old instances finish their
          connections and go. Unchanged services are not touched. A file that does not parse, or changes
          settings only a restart can change, is refused in one line and the running configuration stays.

Signal handlers only set events or spawn tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import inspect
import logging
import os
import platform
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from typing import Any

from activator import __version__
from activator.checkpoints.builder import CheckpointBuilder
from activator.checkpoints.host import clean_leftovers, open_host
from activator.checkpoints.instance import InstanceLauncher
from activator.checkpoints.store import Checkpoint
from activator.config.model import Config, ListenAddress, ServiceConfig, load_config
from activator.core import capacity
from activator.core.reloadplan import Change, Plan, plan_reload
from activator.errors import ActivatorError, ConfigError
from activator.net.network import HostNetwork, ident, kernel_path_possible
from activator.runtime import cgroups, criucache, ksm, preflight
from activator.runtime.ksm import Ksm
from activator.statedir import StateDir
from activator.tasks import spawn

from . import metrics, systemd
from .control import ControlServer
from .listeners import BACKLOG, address_of, bind_listener, take_all
from .metrics import Metrics
from .proxy import ConnectionSet, client_protocol_factory
from .service import Service
from .steering import ServiceSteering

log = logging.getLogger("activator")

#: restores running at once, per CPU (the rest queue): see bench/scaleout.py
RESTORES_PER_CPU = 1
#: how often services' image references are compared with what their checkpoints hold, seconds
IMAGE_CHECK_INTERVAL = 60.0
#: how often kernel-path connections are sampled (conntrack and counters: a few ms of a worker thread each)
METER_INTERVAL = 0.25
#: how long `activator wake|scale` waits for the instances it starts
CONTROL_START_TIMEOUT = 300.0
#: sys.setswitchinterval for the daemon (see startup)
SWITCH_INTERVAL = 0.001
#: how long serve() waits for the services' current checkpoints before READY=1 (builds go on after it)
SETTLE_SECONDS = 2.0
#: every this many meter ticks (5 s), the iptables accepts are checked
FIREWALL_CHECK_TICKS = 20


class Activator:
    def __init__(self, config: Config, *, sockets: list[socket.socket] | None = None,
                 on_ready: Callable[[Activator], None] | None = None,
                 on_service: Callable[[ServiceConfig, str | None], None] | None = None) -> None:
        self.config = config
        self.state = StateDir.of(config)
        self.metrics = Metrics()
        self.services: dict[str, Service] = {}
        self.connections = ConnectionSet()
        self.listeners: dict[str, list[socket.socket]] = {}  # service -> its listening sockets
        self.budget = capacity.Budget(0)
        self._handed_in = list(sockets or [])
        self._servers: dict[str, list[tuple[socket.socket, asyncio.Server]]] = {}
        #: old definitions of changed services, and removed services, while their connections drain
        self._retiring: set[Service] = set()
        self._reloading = asyncio.Lock()
        self._checking: set[str] = set()  # services whose checkpoint is being checked or built
        self._pending: dict[str, asyncio.Task[Any]] = {}  # a reload's unfinished work, per service
        self._from_systemd: dict[str, tuple[ListenAddress, ...]] = {}  # `listen: systemd` services' addresses
        self._restores = asyncio.Semaphore(max(2, RESTORES_PER_CPU * (os.cpu_count() or 1)))
        self._runc: Any = None
        self._metrics_server: Any = None
        self.teardown_failures: list[str] = []  # what shutdown() could not undo (the exit status says so)
        self._control: ControlServer | None = None
        self._builder: CheckpointBuilder | None = None
        self.network: HostNetwork | None = None
        self._network_open = False
        self.ksm: Ksm | None = None
        self._background: set[asyncio.Task[Any]] = set()
        self.started = time.time()
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._on_ready = on_ready
        #: told when a service starts serving (None) or cannot (why): at READY for those settled, later for the rest
        self._on_service = on_service
        self.ready = asyncio.Event()
        self._locked = False
        self._shut_down = False

    def request_stop(self) -> None:
        if self._stop.is_set():
            if not self._force.is_set():
                log.warning("second stop request: cutting the drain short")
            self._force.set()
        self._stop.set()

    async def serve(self, shutdown_trigger: Awaitable[object] | None = None) -> None:
        """Run until SIGTERM/SIGINT, or until shutdown_trigger completes (a caller's own stop condition)."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self._hangup)
        if shutdown_trigger is not None:
            self._keep(spawn(self._stop_when(shutdown_trigger), name="shutdown-trigger"))
        try:
            starting = spawn(self.startup(wait_for_builds=False), name="startup", awaited=True)
            stopping = spawn(self._stop.wait(), name="stop-trigger", awaited=True)
            await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
            stopping.cancel()
            if not starting.done():
                log.info("stop requested during startup")
                starting.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await starting
            else:
                starting.result()  # a startup error (port in use, no CRIU, ...) ends serve() here
                self._announce()
                await self._stop.wait()
        finally:
            await self.shutdown()
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                loop.remove_signal_handler(sig)

    async def _stop_when(self, trigger: Awaitable[object]) -> None:
        await trigger
        self.request_stop()

    def _hangup(self) -> None:
        if not self.ready.is_set():
            log.warning("SIGHUP during startup ignored: reload once the daemon is ready")
            return
        self._keep(spawn(self._reload_logged(), name="reload"))

    async def _reload_logged(self) -> None:
        with contextlib.suppress(ActivatorError):  # already logged, and the old configuration serves on
            await self.reload()

    def _announce(self) -> None:
        self.ready.set()
        if self._on_ready:
            self._on_ready(self)
        if self._on_service:
            for svc in self.config.services:
                service = self.services.get(svc.name)
                if service is not None and (service.checkpoint is not None or service.checkpoint_problem):
                    self._on_service(svc, None if service.checkpoint is not None else service.checkpoint_problem)
        log.info("ready: %s", "; ".join(self._service_state(svc) for svc in self.config.services)
                 or "no service yet (add one to the file and reload)")
        systemd.notify("READY=1", f"STATUS={self._status_line()}")
        interval = systemd.watchdog_interval()
        if interval:
            self._keep(spawn(self._ping_watchdog(interval), name="watchdog"))

    def _service_state(self, svc: ServiceConfig) -> str:
        addrs = " ".join(str(a) for a in svc.listen)
        service = self.services.get(svc.name)
        if service is None or service.checkpoint is not None:
            return f"{svc.name} serving on {addrs}"
        if service.checkpoint_problem is not None:
            return f"{svc.name} NOT serving on {addrs}: no checkpoint ({service.checkpoint_problem})"
        return f"{svc.name} on {addrs}: checkpoint being built (its connections wait for it)"

    def _status_line(self) -> str:
        broken = [s.name for s in self.services.values() if s.checkpoint_problem]
        status = f"serving {len(self.services) - len(broken)} service(s)"
        if broken:
            status += f"; without a checkpoint (retrying): {', '.join(broken)}"
        if self._retiring:
            status += f"; draining {len(self._retiring)} old definition(s)"
        return status

    def _keep(self, task: asyncio.Task[Any]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def startup(self, *, wait_for_builds: bool = True) -> None:
        # A thread that waits for the GIL gets it after at most this long, instead of 5 ms: behind a serving loop
        # that is busy with a flood, the metrics endpoint's thread and the blocking helpers (conntrack samples,
        # nftables, netlink) wait a handoff per I/O call, so a scrape took tens of ms. Only matters under
        # contention; the loop itself loses nothing measurable (bench/scrape_flood.py, docs/benchmarks.md).
        sys.setswitchinterval(SWITCH_INTERVAL)
        for note in self.config.notes:
            log.info("%s: %s", self.config.path, note)
        runc, builder = open_host(self.state, self.config)
        if (parent := cgroups.use_unit_cgroup()) is not None:
            log.info("instance cgroups under this unit's own: /%s", parent)
        self._runc = runc
        self._locked = True
        self.metrics.build_info.labels(__version__, platform.python_version(), builder.criu, builder.runc_version,
                                       platform.release()).set(1)
        self._builder = builder
        self.network = builder.network
        await asyncio.to_thread(criucache.refresh, runc.criu)  # ~30 ms off every CRIU run that follows
        nofile = preflight.raise_nofile()
        self.budget.limit = capacity.connection_budget(nofile, preflight.open_fds(), len(self.config.services))
        if self.budget.limit < 16:
            raise ActivatorError(f"the open file limit ({nofile}) leaves room for {self.budget.limit} connections; "
                                 "raise it (ulimit -n, or LimitNOFILE= in the unit)")
        for svc in self.config.services:
            if svc.max_connections is not None and svc.max_connections > self.budget.limit:
                log.warning("service=%s max_connections %d is more than the open file limit (%d) allows: past "
                            "%d connections in all, clients are refused with reason=resources", svc.name,
                            svc.max_connections, nofile, self.budget.limit)
        cleaned = await clean_leftovers(self.state, runc, builder.images, self.network)
        if cleaned:
            log.warning("cleaned up after a previous run: %s", ", ".join(cleaned))
        if self.network is not None:
            self._network_open = True  # from here on shutdown undoes whatever open() got to
            await asyncio.to_thread(self.network.open)

        from_systemd: dict[str, list[ListenAddress]] = {}
        for svc, sock in take_all(self.config, systemd.listen_fds() + [("", s) for s in self._handed_in]):
            self.listeners.setdefault(svc.name, []).append(sock)
            if not svc.listen:
                from_systemd.setdefault(svc.name, []).append(address_of(sock))
        self._handed_in = []
        self._from_systemd = {name: tuple(addrs) for name, addrs in from_systemd.items()}
        self.config = self._with_systemd_addresses(self.config)

        for svc in self.config.services:
            self.services[svc.name] = await self._make_service(svc, self.config)
            self._limit(svc)
        self._link_dependencies()
        for svc in self.config.services:
            await self._serve(svc.name, self.listeners.get(svc.name, []))

        self._control = ControlServer(self.state.control_socket, {
            "status": self.status, "rebuild": self.rebuild, "reload": self.reload, "plan": self.plan,
            "wake": self.wake, "scale": self.scale, "stop": self.stop_service, "start": self.start_service})
        await self._control.start()

        if self.config.settings.metrics is not None:
            try:
                self._metrics_server = self.metrics.serve(self.config.settings.metrics)
            except OSError as e:
                raise ActivatorError(
                    f"{self.config.path}: settings.metrics: cannot listen on {self.config.settings.metrics}: "
                    f"{e.strerror}; pick another address or set it to null"
                ) from None

        if self.network is not None:
            self._keep(spawn(self._meter(), name="kernel-meter"))
        self._keep(spawn(self._watch_images(), name="image-watch"))
        systemd.notify("STATUS=making sure every service has a current checkpoint")
        first = [spawn(self._first_checkpoint(s), name=f"first-checkpoint:{s.name}", awaited=True)
                 for s in self.config.services]
        for task in first:
            self._keep(task)
        if wait_for_builds:
            await asyncio.gather(*first)
        elif first:
            # A current checkpoint is loaded in milliseconds; a build (a template's app starting) is left to run:
            # one service's slow or failing build must not hold up the others, or READY=1.
            await asyncio.wait(first, timeout=SETTLE_SECONDS)
            for task in first:
                if task.done():
                    task.result()  # a bug in a build is the daemon's failure, as it was before
        self._keep(spawn(self._prune_after(first), name="prune-images"))

    async def _prune_after(self, first: list[asyncio.Task[None]]) -> None:
        await asyncio.gather(*first, return_exceptions=True)
        if self._builder is not None:
            await self._builder.prune_images()

    async def _make_service(self, svc: ServiceConfig, config: Config, *, sweeps: bool = True) -> Service:
        """A Service with its InstanceLauncher (not yet serving: no listener, no checkpoint)."""
        assert self._builder is not None
        m = self.metrics.for_service(svc.name)
        launcher = InstanceLauncher(svc, self._runc, self.state.instances, self.state.logs, m, self.network,
                            await self._ksm_for(config.shares_memory(svc)), self._restores)
        return Service(svc, launcher=launcher, metrics=m, budget=self.budget,
                       store=self._builder.store if sweeps else None)

    async def _ksm_for(self, shares: bool) -> Ksm | None:
        """The Ksm a sharing service's launcher marks its instances for (started on first use), or None."""
        if shares and self.ksm is None:
            if ksm.available():
                self.ksm = Ksm(self.state.root / ksm.SAVED_NAME)
                await asyncio.to_thread(self.ksm.start)
                self._keep(spawn(self._pace_ksm(self.ksm), name="ksm-pacer"))
            else:
                log.warning("share_memory is on but this kernel has no KSM (/sys/kernel/mm/ksm): nothing is shared")
        return self.ksm if shares else None

    def _with_systemd_addresses(self, config: Config) -> Config:
        """`listen: systemd` services, with the addresses of the sockets systemd passed for them at start."""
        services = []
        for svc in config.services:
            if not svc.listen:
                if svc.name not in self._from_systemd:
                    raise ConfigError(f"{config.path}: services.{svc.name}.listen: systemd passes sockets only at "
                                      "start; restart the service to take new ones")
                svc = dataclasses.replace(svc, listen=self._from_systemd[svc.name])
            services.append(svc)
        return dataclasses.replace(config, services=tuple(services))

    def _limit(self, svc: ServiceConfig) -> None:
        """The service's kernel-side counters, max_connections and connection timeouts, before its first
        connection is accepted."""
        if self.network is not None and kernel_path_possible(svc):
            self.network.limit(svc.name, svc.listen, svc.max_connections, svc.client_idle_timeout)

    async def _serve(self, name: str, socks: list[socket.socket]) -> None:
        """Accept on these sockets for whichever Service holds the name at the time (a reload swaps it)."""
        loop = asyncio.get_running_loop()

        def current() -> Service:
            return self.services[name]

        factory = client_protocol_factory(current, self.connections)
        for sock in socks:
            server = await loop.create_server(factory, sock=sock, backlog=BACKLOG)
            self._servers.setdefault(name, []).append((sock, server))

    def _unlisten(self, name: str, keep: tuple[socket.socket, ...] = ()) -> None:
        """Stop accepting on the service's sockets, except those kept (a changed service's unchanged addresses)."""
        serving = []
        for sock, server in self._servers.get(name, []):
            if sock in keep:
                serving.append((sock, server))
            else:
                server.close()
        self._servers[name] = serving
        for sock in self.listeners.get(name, []):
            if sock not in keep:
                sock.close()  # closing the server detached it already (uvloop): this is for a socket never served
        self.listeners[name] = [sock for sock in self.listeners.get(name, []) if sock in keep]
        if not self.listeners[name]:
            del self.listeners[name]
            self._servers.pop(name, None)

    def _use(self, svc: ServiceConfig, checkpoint: Checkpoint) -> None:
        """Hand a service its checkpoint, and its kernel path if the app can be reached on its own address."""
        service = self.services[svc.name]
        if self.network is not None and kernel_path_possible(svc) and checkpoint.kernel_path:
            if service.steering is None:
                service.steering = ServiceSteering(self.network, svc)
        elif service.steering is not None:
            service.withdraw_all()
            service.steering = None
        service.set_checkpoint(checkpoint)

    async def _keep_network(self, tick: int) -> None:
        """Put back what the host's firewall tools took: our tables (checked every tick, ~1 ms) and our iptables
        accepts (every FIREWALL_CHECK_TICKS, two `iptables -C`). Counted, logged; a failed repair is retried."""
        net = self.network
        assert net is not None
        for svc in (*self.services.values(), *self._retiring):
            steering = svc.steering
            if isinstance(steering, ServiceSteering) and steering.failures:
                self.metrics.kernel_path_failures.labels(svc.name).inc(steering.failures)
                steering.failures = 0
        try:
            if not await asyncio.to_thread(net.intact):
                await asyncio.to_thread(net.repair)
                self.metrics.network_repairs.labels("nftables").inc()
                log.warning("the instance network's nftables tables were missing or out of date (a firewall reload?); "
                            "put back with every instance and service rule")
            if tick % FIREWALL_CHECK_TICKS == 0 and not await asyncio.to_thread(net.firewall_intact):
                await asyncio.to_thread(net.repair_firewall)
                self.metrics.network_repairs.labels("iptables").inc()
                log.warning("activator's accepts in iptables were gone (a Docker restart or a firewall reload?); "
                            "put back")
        except Exception as e:  # retried next tick; the services keep their userspace path meanwhile
            if tick % FIREWALL_CHECK_TICKS == 0:
                log.warning("repairing the instance network failed: %s; retrying", e)

    async def _meter(self) -> None:
        """Kernel-path connections send no events: sample them (conntrack, counters) a few times a second."""
        assert self.network is not None
        tick = 0
        while True:
            tick += 1
            await self._keep_network(tick)
            started = time.monotonic()
            try:
                samples = await asyncio.to_thread(self.network.sample)
            except Exception as e:  # a netlink hiccup must not end the sampling for good
                log.warning("sampling the kernel path failed: %s", e)
                await asyncio.sleep(1)
                continue
            now = time.monotonic()
            for svc in self.services.values():
                if svc.steering is None:
                    continue
                key = ident(svc.name)
                svc.kernel_sample(samples.by_mark, samples.rejected.get(key, 0), samples.steered.get(key, 0), now)
            for svc in list(self._retiring):  # the service's counters are the current definition's to fold in
                svc.kernel_sample(samples.by_mark, *svc.kernel_counters, now)
            # A sample costs ~10 us per connection (a flood of thousands: tens of ms of the GIL): never more than
            # a tenth of the daemon's time.
            await asyncio.sleep(max(METER_INTERVAL, 9 * (now - started)))

    async def _watch_images(self) -> None:
        """Tell (activator_checkpoint_outdated, a log line) when a service's image reference has moved on to
        another image than its checkpoint holds, e.g. after a `docker pull`. Not rebuilt on its own: a rebuild
        runs the new image's app, which is an operator's call (`activator checkpoint --rebuild`, a restart)."""
        assert self._builder is not None
        images = self._builder.images
        told: set[tuple[str, str]] = set()
        while True:
            await asyncio.sleep(IMAGE_CHECK_INTERVAL)
            resolved: dict[str, Any] = {}  # one engine query per image reference per round
            for service in list(self.services.values()):
                ck = service.checkpoint
                if ck is None:
                    continue
                ref = service.config.image
                try:
                    if ref not in resolved:
                        resolved[ref] = await asyncio.to_thread(images.resolve, ref, service.name)
                    image = resolved[ref]
                except Exception as e:  # the engine away, the image removed: not a reason to stop watching
                    log.debug("service=%s image check failed: %s", service.name, e)
                    continue
                outdated = image.id != ck.origin.image_id
                service.m.checkpoint_outdated.set(int(outdated))
                if outdated and (service.name, image.id) not in told:
                    told.add((service.name, image.id))
                    log.warning("service=%s image %s is now %s, its checkpoint holds %s; rebuild it with "
                                "`activator checkpoint --rebuild %s` when ready", service.name, service.config.image,
                                image.short_id, ck.origin.image_id[:19], service.name)

    async def _pace_ksm(self, k: Ksm) -> None:
        while True:
            await asyncio.sleep(5)
            k.tick()

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
            "connection_budget": self.budget.limit,
            "services": [s.status() for s in self.services.values()],
            # old definitions (a reload removed or changed them) still finishing their connections
            "retiring": sorted(s.name for s in self._retiring),
        }

    # --- reload ---------------------------------------------------------------------------------------------

    async def plan(self, path: str = "") -> dict[str, Any]:
        """What reloading `path` (default: the running file) would change; raises ConfigError if refused."""
        new = await self._read_config(path or self.config.path)
        return {"config": str(new.path), "changes": plan_reload(self.config, new).describe()}

    async def _read_config(self, path: str | Path) -> Config:
        return self._with_systemd_addresses(await asyncio.to_thread(load_config, path))

    async def reload(self) -> dict[str, Any]:
        """Re-read the running file and apply it (module docstring). One at a time."""
        async with self._reloading:
            systemd.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                           "STATUS=reloading the configuration")
            try:
                return await self._reload()
            finally:
                systemd.notify("READY=1", f"STATUS={self._status_line()}")

    async def _reload(self) -> dict[str, Any]:
        try:
            new = await self._read_config(self.config.path)
            p = plan_reload(self.config, new)
            fresh = await asyncio.to_thread(self._bind_new, p, new)
        except ActivatorError as e:
            self.metrics.reloads.labels("refused").inc()
            log.error("reload refused, the running configuration stays: %s", e)
            raise
        # A change still being prepared (its checkpoint building) for a service this plan removes or changes
        # again is superseded: stop it first (what it had swapped in already drains on its own).
        for name in {s.name for s in p.removed} | {c.new.name for c in p.changed}:
            pending = self._pending.get(name)
            if pending is not None and not pending.done():
                pending.cancel()
                await asyncio.wait([pending])
        self.config = new
        for svc in p.removed:
            old = self.services.pop(svc.name)
            self._unlisten(svc.name)
            self._withdraw(old, removed=True)
            self._keep(spawn(self._drain_and_close(old, removed=True), name=f"retire:{svc.name}"))
        for svc in p.added:
            self.services[svc.name] = await self._make_service(svc, new)
            self._limit(svc)
            self.listeners[svc.name] = fresh.get(svc.name, [])
            await self._serve(svc.name, self.listeners[svc.name])
            self._track(svc.name, self._first_checkpoint(svc), "checkpoint")
        for change in p.changed:
            self._track(change.new.name, self._replace(change, fresh.get(change.new.name, [])), "replace")
        for name, shares in p.resharing:
            await self.services[name].launcher.reshare(await self._ksm_for(shares))
        self._link_dependencies()
        for note in new.notes:
            log.info("%s: %s", new.path, note)
        self.metrics.reloads.labels("applied").inc()
        lines = p.describe()
        log.info("reloaded %s: %s", new.path, "; ".join(lines))
        return {"config": str(new.path), "changes": lines}

    def _link_dependencies(self) -> None:
        """depends_on as Service objects, after every change to the set of services (a start, a reload, a
        changed service taking over)."""
        for svc in self.services.values():
            svc.dependants = []
        for svc in self.services.values():
            svc.dependencies = [self.services[d] for d in svc.config.depends_on if d in self.services]
            for dep in svc.dependencies:
                dep.dependants.append(svc)

    def _track(self, name: str, coro: Coroutine[Any, Any, None], what: str) -> None:
        """A reload's work for one service, which a later reload may supersede (_reload cancels it)."""
        task = spawn(coro, name=f"{what}:{name}")
        self._keep(task)
        self._pending[name] = task
        task.add_done_callback(lambda t: self._pending.pop(name, None) if self._pending.get(name) is t else None)

    def _bind_new(self, p: Plan, new: Config) -> dict[str, list[socket.socket]]:
        """Sockets for every listen address the new file has and the running one does not. All or none."""
        bound: dict[str, list[socket.socket]] = {}
        try:
            for svc in (*p.added, *(c.new for c in p.changed)):
                have = self.listeners.get(svc.name, [])
                for addr in svc.listen:
                    if not any(systemd.same_address(sock, addr) for sock in have):
                        bound.setdefault(svc.name, []).append(bind_listener(addr, svc, new))
        except BaseException:
            for socks in bound.values():
                for sock in socks:
                    sock.close()
            raise
        return bound

    async def _replace(self, change: Change, fresh: list[socket.socket]) -> None:
        """A changed service: its new definition gets its checkpoint while the old one serves, then takes over the
        listeners; the old instances drain. If the new checkpoint cannot be made, the old definition stays."""
        assert self._builder is not None
        name, svc = change.new.name, change.new
        old = self.services[name]
        try:
            checkpoint, built = await self._builder.ensure(svc)
        except asyncio.CancelledError:  # superseded by a later reload: nothing was swapped in yet
            for sock in fresh:
                sock.close()
            raise
        except ActivatorError as e:
            for sock in fresh:
                sock.close()
            self.config = dataclasses.replace(
                self.config, services=tuple(change.old if s.name == name else s for s in self.config.services))
            old.m.checkpoint_build_failures.inc()
            log.error("service=%s keeps its previous definition: the new one's checkpoint failed: %s", name, e)
            return
        if built:
            log.info("service=%s new checkpoint built in %.1fs for its new definition", name,
                     checkpoint.build_seconds)
        # The old instances still mount the replaced checkpoint: nothing may sweep it until they are gone.
        new = await self._make_service(svc, self.config, sweeps=False)
        new.take_counters_from(old)
        self.services[name] = new  # from here the listeners hand new connections to it
        self._link_dependencies()
        self._withdraw(old, removed=False)
        self._limit(svc)
        self._use(svc, checkpoint)
        keep = tuple(sock for sock in self.listeners.get(name, [])
                     if any(systemd.same_address(sock, a) for a in svc.listen))
        self._unlisten(name, keep)
        self.listeners.setdefault(name, []).extend(fresh)
        await self._serve(name, fresh)
        # Not part of this task: a later reload may cancel a change being prepared, never a drain.
        self._keep(spawn(self._drain_and_close(old, removed=False, then=new), name=f"retire:{name}"))

    def _withdraw(self, old: Service, *, removed: bool) -> None:
        """An old definition leaves the kernel path and its gauges; it keeps serving the connections it has."""
        old.m = metrics.detached(old.m)
        old.store = None  # it must not sweep the checkpoint a new definition may be using
        old.withdraw_all()
        old.steering = None
        if self.network is not None:
            self.network.forget(old.name, counters=removed)
        self._retiring.add(old)

    async def _drain_and_close(self, old: Service, *, removed: bool, then: Service | None = None) -> None:
        """Let an old definition's connections finish (up to drain_timeout), then close it."""
        try:
            deadline = time.monotonic() + self.config.settings.drain_timeout
            while old.open_connections + old.kernel_connections and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            if old.open_connections + old.kernel_connections:
                log.warning("service=%s: %d connection(s) of its old definition cut after drain_timeout",
                            old.name, old.open_connections + old.kernel_connections)
            await old.close()
        finally:
            self._retiring.discard(old)
        if removed and old.name not in self.services:
            self.metrics.forget_service(old.name)
        if then is not None and then is self.services.get(old.name) and self._builder is not None:
            then.store = self._builder.store
            then.sweep_if_unused()
        log.info("service=%s %s", old.name, "removed" if removed else "old definition drained and closed")

    # --- runtime control: activator wake|scale|stop|start SERVICE (root only, over the control socket) -------

    def _service(self, name: str) -> Service:
        svc = self.services.get(name)
        if svc is None:
            raise ActivatorError(f"no service named '{name}' (known: {', '.join(self.services) or 'none'})")
        return svc

    def _controlled(self, svc: Service, action: str, what: str) -> None:
        self.metrics.control_actions.labels(svc.name, action).inc()
        log.info("service=%s %s (activator %s)", svc.name, what, action)

    async def wake(self, name: str = "") -> dict[str, Any]:
        """Restore one instance now, without a client (if none runs)."""
        svc = self._service(name)
        had = len(svc.instances)
        up = had or await svc.scale_to(1, timeout=CONTROL_START_TIMEOUT)
        self._controlled(svc, "wake", "woken" if not had else f"already awake ({had} instance(s))")
        return {"service": name, "instances": up, "woken": not had}

    async def scale(self, name: str = "", n: str = "") -> dict[str, Any]:
        """Restore instances now until n are up (at most max_instances)."""
        svc = self._service(name)
        if not n.isdigit() or not 1 <= int(n) <= 10_000:
            raise ActivatorError(f"scale {name}: give a number of instances from 1 to {svc.config.max_instances}")
        up = await svc.scale_to(int(n), timeout=CONTROL_START_TIMEOUT)
        self._controlled(svc, "scale", f"scaled to {up} instance(s) (asked {n}, max_instances "
                                       f"{svc.config.max_instances})")
        return {"service": name, "instances": up, "max_instances": svc.config.max_instances}

    async def stop_service(self, name: str = "") -> dict[str, Any]:
        """Stop serving (connections refused, reason `stopped`), drain, stop every instance; until `start`."""
        svc = self._service(name)
        await svc.stop_serving(self.config.settings.drain_timeout)
        self._controlled(svc, "stop", "stopped: connections refused until `activator start`")
        return {"service": name, "stopped": True}

    async def start_service(self, name: str = "") -> dict[str, Any]:
        svc = self._service(name)
        svc.start_serving()
        self._controlled(svc, "start", "serving again")
        return {"service": name, "stopped": False}

    async def rebuild(self, name: str = "") -> dict[str, Any]:
        """Build a fresh checkpoint for one service and switch new instances to it; running ones carry on."""
        svc = self.config.service(name)
        assert self._builder is not None
        ck, _ = await self._builder.ensure(svc, rebuild=True)
        self._use(svc, ck)
        log.info("service=%s checkpoint rebuilt in %.1fs on request", svc.name, ck.build_seconds)
        return {"service": svc.name, "dir": str(ck.dir), "build_seconds": ck.build_seconds,
                "listening_ports": list(ck.listening_ports), "pages_bytes": ck.pages_bytes}

    async def _first_checkpoint(self, svc: ServiceConfig) -> None:
        if not await self._build(svc):
            self._keep(spawn(self._retry_checkpoint(svc), name=f"checkpoint-retry:{svc.name}"))

    async def _build(self, svc: ServiceConfig, failures: int = 0) -> bool:
        """One attempt at the service's checkpoint. False (logged, counted, service refusing) if it failed."""
        self._checking.add(svc.name)
        self._tell_progress()
        try:
            return await self._build_once(svc, failures)
        finally:
            self._checking.discard(svc.name)
            self._tell_progress()

    async def _build_once(self, svc: ServiceConfig, failures: int) -> bool:
        assert self._builder is not None
        service = self.services.get(svc.name)
        if service is None or service.config is not svc:
            return True  # a reload removed or replaced it before this attempt: its own build is under way
        t0 = time.monotonic()
        try:
            checkpoint, built = await self._builder.ensure(svc)
        except ActivatorError as e:
            why = str(e)
        except Exception as e:  # a bug must not take the other services down with it
            log.exception("service=%s checkpoint build crashed", svc.name)
            why = f"{type(e).__name__}: {e}"
        else:
            if self.services.get(svc.name) is not service:
                return True  # a reload replaced it meanwhile: this checkpoint is for a definition gone
            if built:
                self._keep(spawn(self._builder.prune_images(), name="prune-images"))
                service.m.checkpoint_builds.inc()
                service.m.checkpoint_build_duration.observe(time.monotonic() - t0)
                log.info("service=%s checkpoint built in %.1fs (%d MiB of pages)", svc.name,
                         checkpoint.build_seconds, checkpoint.pages_bytes // 2**20)
            had = service.checkpoint is not None
            self._use(svc, checkpoint)
            if self.ready.is_set() and not had:
                log.info("service=%s serving on %s", svc.name, " ".join(str(a) for a in svc.listen))
                if self._on_service:
                    self._on_service(svc, None)
            return True
        if self.services.get(svc.name) is not service:
            return True
        delay = svc.backoff.delay(failures + 1)
        service.m.checkpoint_build_failures.inc()
        service.checkpoint_failed(why, delay)
        log.error("service=%s not serving: no checkpoint (%s); its connections are refused; next attempt in %gs",
                  svc.name, why, delay)
        if self.ready.is_set() and self._on_service and failures == 0:
            self._on_service(svc, why)
        return False

    def _tell_progress(self) -> None:
        """systemd's STATUS= (what `systemctl status` shows) while checkpoints are being checked or built."""
        if self._checking:
            systemd.notify(f"STATUS=checkpoints: checking or building {', '.join(sorted(self._checking))}")
        elif self.ready.is_set():
            systemd.notify(f"STATUS={self._status_line()}")

    async def _retry_checkpoint(self, svc: ServiceConfig) -> None:
        failures = 1
        service = self.services[svc.name]
        while service.checkpoint is None:
            await asyncio.sleep(svc.backoff.delay(failures))
            if self.services.get(svc.name) is not service:
                return  # a reload removed or replaced it
            if service.checkpoint is not None:
                return  # an operator's `activator checkpoint --rebuild` got there first
            if await self._build(svc, failures):
                return
            failures += 1

    async def shutdown(self) -> None:
        """Idempotent: a caller that stops the daemon itself may be followed by its owner's own shutdown.

        Every step runs whatever an earlier one raised (a flushed firewall, a busy cgroup, a mount that will not
        go): each failure is logged and kept in teardown_failures, and the rest is still released. The exit
        status says so (cmd_run returns 1)."""
        if self._shut_down:
            return
        self._shut_down = True
        drain = self.config.settings.drain_timeout
        # Never let systemd's stop timeout cut the drain short: ask for the drain plus room to release.
        grace = max((s.config.stop_grace for s in self.services.values()), default=0.0)
        systemd.notify("STOPPING=1", f"EXTEND_TIMEOUT_USEC={int((drain + grace + 30) * 1e6)}",
                       f"STATUS=draining {len(self.connections)} connection(s)")
        failures_before = len(self._runc.failures) if self._runc is not None else 0
        for name in list(self.listeners):
            await self._step(f"closing the listeners of {name}", self._unlisten, name)
        for svc in (*self.services.values(), *self._retiring):
            # the kernel sends nobody new to any instance; open connections drain
            await self._step(f"withdrawing {svc.name}'s instances", svc.withdraw_all)
        for task in list(self._background):
            task.cancel()
        kernel = await self._kernel_open()
        if self.connections or kernel:
            log.info("draining %d connection(s) for up to %gs", len(self.connections) + kernel, drain)
            drained = spawn(self._drained(), name="drain", awaited=True)
            forced = spawn(self._force.wait(), name="force-stop", awaited=True)
            await asyncio.wait({drained, forced}, timeout=drain, return_when=asyncio.FIRST_COMPLETED)
            drained.cancel()
            forced.cancel()
            for conn in self.connections:
                conn.abort()
        closed = await asyncio.gather(*(s.close() for s in (*self.services.values(), *self._retiring)),
                                      return_exceptions=True)
        for svc, result in zip((*self.services.values(), *self._retiring), closed, strict=True):
            if isinstance(result, BaseException):
                self._failed(f"closing {svc.name}", result)
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
        if self._control is not None:
            await self._step("closing the control socket", self._control.close)
        if self._metrics_server is not None:
            await self._step("stopping the metrics endpoint", asyncio.to_thread, self._metrics_server.shutdown)
        if self.network is not None and self._network_open:
            await self._step("removing the instance network", asyncio.to_thread, self.network.close)
        if self.ksm is not None:
            await self._step("putting KSM's settings back", asyncio.to_thread, self.ksm.stop)
        if self._runc is not None:  # what sandboxes could not release (each logged where it happened)
            self.teardown_failures += self._runc.failures[failures_before:]
        if self._locked:
            await self._step("unlocking the state dir", self.state.unlock)
        if self.teardown_failures:
            log.error("stopped, but %d cleanup step(s) failed: %s", len(self.teardown_failures),
                      "; ".join(self.teardown_failures)[:2000])
        else:
            log.info("stopped")

    async def _step(self, what: str, fn: Callable[..., Any], *args: Any) -> None:
        """One teardown step: its failure is recorded, never raised (the next step must still run)."""
        try:
            result = fn(*args)
            if inspect.isawaitable(result):
                await result
        except Exception as e:
            self._failed(what, e)

    def _failed(self, what: str, e: BaseException) -> None:
        log.warning("stopping: %s failed: %s", what, e)
        self.teardown_failures.append(f"{what}: {e}")

    async def _kernel_open(self) -> int:
        if self.network is None or not self._network_open:
            return 0
        try:
            samples = await asyncio.to_thread(self.network.sample)
        except Exception:
            return 0
        return sum(s.open for s in samples.by_mark.values())

    async def _drained(self) -> None:
        """Until no connection is open on either path."""
        while True:
            await self.connections.wait_empty()
            if not await self._kernel_open():
                return
            await asyncio.sleep(0.1)
