"""The one lifecycle owner: startup, serve, shutdown.

serve() = startup() raced against the stop trigger -> wait for a stop request -> shutdown(); shutdown releases
whatever startup got to, so a SIGTERM during a long first checkpoint build stops promptly and leaves nothing.

startup:  check the host, lock the state dir, raise the descriptor limit and size the connection budget from it,
          clean what a crashed run left, take the listening sockets handed in (LISTEN_FDS, or a caller's) and
          bind the rest (a port in use fails here, before anything else starts), start accepting (early
          connections simply wait), start the control socket and the metrics endpoint, then make sure every
          service has a current checkpoint (builds.py). Services are independent: serve() tells systemd READY=1
          once the current checkpoints are loaded (a second at most), while checkpoints still being built go on in
          the background; each service says when it serves or why not. A watchdog ping is sent from the event
          loop itself. (startup() alone, as tests call it, waits for every first build.)
shutdown: stop accepting, let open connections finish up to drain_timeout (systemd is told to extend its stop
          timeout accordingly; a second SIGTERM/SIGINT cuts the drain short), abort the rest, kill and release
          every instance, then undo what startup acquired, in reverse: the endpoints, the services' listeners,
          the instance network, KSM's settings, the state dir's lock.

Each startup step that acquires something pushes its undo onto one AsyncExitStack before (or as) it acquires it,
so a failure or a SIGTERM half-way through startup undoes exactly what was acquired; every listener (listening.py)
is started and stopped the same way.

What it owns lives in fleet.py (the services, their listeners, the shared host pieces); reloads are
carried out by reloading.py, checkpoint builds and retries by builds.py, the background loops are watchers.py,
and the control socket's verbs are commands.py. Signal handlers only set events or spawn tasks.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import platform
import signal
import socket
import sys
from collections.abc import Awaitable, Callable
from typing import Any

from activator import __version__
from activator.checkpoints.host import clean_leftovers, open_host
from activator.config.document import Config
from activator.errors import ActivatorError
from activator.net.network import HostNetwork
from activator.runtime import cgroups, criucache
from activator.statedir import StateDir
from activator.tasks import spawn

from . import listening, systemd, watchers
from .agent import Agent
from .builds import Builds
from .commands import Commands
from .control import ControlServer
from .fleet import Fleet, ServiceHook
from .metrics import Metrics
from .proxy import ConnectionSet
from .reloading import Reloader
from .service import Service

log = logging.getLogger("activator")

#: sys.setswitchinterval for the daemon (see startup)
SWITCH_INTERVAL = 0.001
#: how long serve() waits for the services' current checkpoints before READY=1 (builds go on after it)
SETTLE_SECONDS = 2.0


class Activator:
    def __init__(self, config: Config, *, sockets: list[socket.socket] | None = None,
                 on_ready: Callable[[Activator], None] | None = None,
                 on_service: ServiceHook | None = None) -> None:
        self.fleet = Fleet(config, StateDir.of(config), Metrics(), on_service=on_service)
        self.builds = Builds(self.fleet)
        self.reloader = Reloader(self.fleet, self.builds)
        self.commands = Commands(self.fleet, self.builds, self.reloader)
        self.agent = Agent(self.fleet)
        self._handed_in = list(sockets or [])
        self.teardown_failures: list[str] = []  # what shutdown() could not undo (the exit status says so)
        self._acquired = contextlib.AsyncExitStack()  # startup's undo steps (each through _step), in order
        self._stop = asyncio.Event()
        self._force = asyncio.Event()
        self._on_ready = on_ready
        self._shut_down = False

    # What callers (the CLI, tests, benches) look at: the fleet's, by their old names.
    @property
    def config(self) -> Config:
        return self.fleet.config

    @property
    def state(self) -> StateDir:
        return self.fleet.state

    @property
    def metrics(self) -> Metrics:
        return self.fleet.metrics

    @property
    def services(self) -> dict[str, Service]:
        return self.fleet.services

    @property
    def listeners(self) -> dict[str, list[socket.socket]]:
        return self.fleet.listeners

    @property
    def connections(self) -> ConnectionSet:
        return self.fleet.connections

    @property
    def network(self) -> HostNetwork | None:
        return self.fleet.network

    @property
    def ready(self) -> asyncio.Event:
        return self.fleet.ready

    def status(self) -> dict[str, Any]:
        return self.fleet.status()

    async def reload(self) -> dict[str, Any]:
        return await self.reloader.reload()

    async def rebuild(self, name: str = "") -> dict[str, Any]:
        return await self.builds.rebuild(name)

    async def plan(self, path: str = "") -> dict[str, Any]:
        return await self.reloader.plan(path)

    # --- running ---------------------------------------------------------------------------------------------

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
            self.fleet.tasks.spawn(self._stop_when(shutdown_trigger), name="shutdown-trigger")
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
        self.fleet.tasks.spawn(self._reload_logged(), name="reload")

    async def _reload_logged(self) -> None:
        with contextlib.suppress(ActivatorError):  # already logged, and the old configuration serves on
            await self.reloader.reload()

    def _announce(self) -> None:
        fleet = self.fleet
        fleet.ready.set()
        if self._on_ready:
            self._on_ready(self)
        if fleet.on_service:
            for svc in fleet.config.services:
                service = fleet.services.get(svc.name)
                if service is not None and (service.checkpoint is not None or service.checkpoint_problem):
                    fleet.on_service(svc, None if service.checkpoint is not None else service.checkpoint_problem)
        log.info("ready: %s", "; ".join(fleet.service_state(svc) for svc in fleet.config.services)
                 or "no service yet (add one to the file and reload)")
        systemd.notify("READY=1", f"STATUS={fleet.status_line()}")
        interval = systemd.watchdog_interval()
        if interval:
            fleet.tasks.spawn(watchers.ping_watchdog(interval), name="watchdog")

    async def startup(self, *, wait_for_builds: bool = True) -> None:
        fleet = self.fleet
        undo = self._acquired.push_async_callback
        # A thread that waits for the GIL gets it after at most this long, instead of 5 ms: behind a serving loop
        # that is busy with a flood, the metrics endpoint's thread and the blocking helpers (conntrack samples,
        # nftables, netlink) wait a handoff per I/O call, so a scrape took tens of ms. Only matters under
        # contention; the loop itself loses nothing measurable (bench/scrape_flood.py, docs/benchmarks.md).
        sys.setswitchinterval(SWITCH_INTERVAL)
        for note in fleet.config.notes:
            log.info("%s: %s", fleet.config.path, note)
        host = fleet.host = open_host(fleet.state, fleet.config)
        undo(self._step, "unlocking the state dir", fleet.state.unlock)
        undo(self._ksm_back)  # started by the first service that shares memory, whenever that is
        host.builder.exchange.on_transfer = lambda *labels: fleet.metrics.checkpoint_transfers.labels(*labels).inc()
        if (parent := cgroups.use_unit_cgroup()) is not None:
            log.info("instance cgroups under this unit's own: /%s", parent)
        fleet.metrics.build_info.labels(__version__, platform.python_version(), host.builder.criu,
                                        host.builder.runc_version, platform.release()).set(1)
        await asyncio.to_thread(criucache.refresh, host.runc.criu)  # ~30 ms off every CRIU run that follows
        fleet.size_budget()
        cleaned = await clean_leftovers(fleet.state, host.runc, host.builder.images, host.network)
        if cleaned:
            log.warning("cleaned up after a previous run: %s", ", ".join(cleaned))
        if (network := host.network) is not None:
            fleet.network_open = True
            # pushed first: whatever open() got to is undone
            undo(self._step, "removing the instance network", asyncio.to_thread, network.close)
            await asyncio.to_thread(network.open)
        undo(self._unlisten_all)  # by then shutdown stopped them already; this is for a startup cut short
        fleet.take_listeners(self._handed_in)
        self._handed_in = []
        for svc in fleet.config.services:
            fleet.services[svc.name] = await fleet.make_service(svc, fleet.config)
            fleet.limit(svc)
        fleet.link_dependencies()
        for svc in fleet.config.services:
            await fleet.start_listening(svc.name)
        await listening.start(self._acquired, ControlServer(fleet.state.control_socket, self.commands.handlers()),
                              self._step)
        if (metrics_at := fleet.config.settings.metrics) is not None:
            try:
                await listening.start(self._acquired, fleet.metrics.endpoint(metrics_at), self._step)
            except OSError as e:
                raise ActivatorError(f"{fleet.config.path}: settings.metrics: cannot listen on {metrics_at}: "
                                     f"{e.strerror}; pick another address or set it to null") from None
        if (agent_settings := fleet.config.settings.agent) is not None:
            try:
                await listening.start(self._acquired, self.agent, self._step)
            except OSError as e:
                raise ActivatorError(f"{fleet.config.path}: settings.agent.listen: cannot listen on "
                                     f"{agent_settings.listen}: {e.strerror}; pick another address or remove "
                                     "settings.agent") from None
        fleet.tasks.spawn(watchers.meter(fleet), name="meter")  # every steering mode's samples
        fleet.tasks.spawn(watchers.watch_images(fleet), name="image-watch")
        fleet.tasks.spawn(watchers.keep_alive_schedules(fleet), name="keep-alive-schedules")
        await self._first_checkpoints(wait_for_builds)

    async def _first_checkpoints(self, wait_for_builds: bool) -> None:
        fleet = self.fleet
        systemd.notify("STATUS=making sure every service has a current checkpoint")
        first = [fleet.tasks.spawn(self.builds.first(s), name=f"first-checkpoint:{s.name}", awaited=True)
                 for s in fleet.config.services]
        if wait_for_builds:
            await asyncio.gather(*first)
        elif first:
            # A current checkpoint is loaded in milliseconds; a build (a template's app starting) is left to run:
            # one service's slow or failing build must not hold up the others, or READY=1.
            await asyncio.wait(first, timeout=SETTLE_SECONDS)
            for task in first:
                if task.done():
                    task.result()  # a bug in a build is the daemon's failure, as it was before
        fleet.tasks.spawn(self.builds.prune_after(first), name="prune-images")

    # --- stopping --------------------------------------------------------------------------------------------

    async def _announce_drain(self) -> None:
        """Balancers hear `drain` first and stop sending new clients here, while the listeners still take what
        they send meanwhile (a second stop request cuts this short)."""
        self.agent.draining = True
        notice = self.fleet.config.settings.agent.drain_notice if self.fleet.config.settings.agent else 0.0
        if notice and self.fleet.ready.is_set() and not self._force.is_set():
            log.info("telling balancers to drain; serving on for %gs (settings.agent.drain_notice)", notice)
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._force.wait(), notice)

    async def shutdown(self) -> None:
        """Idempotent: a caller that stops the daemon itself may be followed by its owner's own shutdown.

        Every step runs whatever an earlier one raised (a flushed firewall, a busy cgroup, a mount that will not
        go): each failure is logged and kept in teardown_failures, and the rest is still released. The exit
        status says so (cmd_run returns 1)."""
        if self._shut_down:
            return
        self._shut_down = True
        fleet = self.fleet
        runc = fleet.host.runc if fleet.host is not None else None
        drain = fleet.config.settings.drain_timeout
        # Never let systemd's stop timeout cut the drain short: ask for the drain plus room to release.
        grace = max((s.config.stop_grace for s in fleet.services.values()), default=0.0)
        systemd.notify("STOPPING=1", f"EXTEND_TIMEOUT_USEC={int((drain + grace + 30) * 1e6)}",
                       f"STATUS=draining {len(fleet.connections)} connection(s)")
        failures_before = len(runc.failures) if runc is not None else 0
        await self._announce_drain()
        await self._unlisten_all()
        # Taken before the tasks are cancelled: a reload's old definition still draining leaves `retiring` when its
        # drain task is cancelled, and its instances would outlive the daemon.
        everyone = (*fleet.services.values(), *fleet.retiring)
        for svc in everyone:
            # the kernel sends nobody new to any instance; open connections drain
            await self._step(f"withdrawing {svc.name}'s instances", svc.withdraw_all)
        fleet.tasks.cancel()
        await self._drain(drain)
        closed = await asyncio.gather(*(s.close() for s in everyone), return_exceptions=True)
        for svc, result in zip(everyone, closed, strict=True):
            if isinstance(result, BaseException):
                self._failed(f"closing {svc.name}", result)
        await fleet.tasks.wait()
        if runc is not None:  # what sandboxes could not release (each logged where it happened)
            self.teardown_failures += runc.failures[failures_before:]
        await self._acquired.aclose()  # its steps report their failures (_step) rather than raise
        if self.teardown_failures:
            log.error("stopped, but %d cleanup step(s) failed: %s", len(self.teardown_failures),
                      "; ".join(self.teardown_failures)[:2000])
        else:
            log.info("stopped")

    async def _unlisten_all(self) -> None:
        for name in list(self.fleet.listening):
            await self._step(f"closing the listeners of {name}", self.fleet.unlisten, name)

    async def _ksm_back(self) -> None:
        if self.fleet.ksm is not None:
            await self._step("putting KSM's settings back", asyncio.to_thread, self.fleet.ksm.stop)

    async def _drain(self, drain: float) -> None:
        """Open connections on either path finish, up to drain (or a second stop request); the rest are cut."""
        fleet = self.fleet
        kernel = await fleet.kernel_open()
        if not fleet.connections and not kernel:
            return
        log.info("draining %d connection(s) for up to %gs", len(fleet.connections) + kernel, drain)
        drained = spawn(fleet.drained(), name="drain", awaited=True)
        forced = spawn(self._force.wait(), name="force-stop", awaited=True)
        await asyncio.wait({drained, forced}, timeout=drain, return_when=asyncio.FIRST_COMPLETED)
        drained.cancel()
        forced.cancel()
        for conn in fleet.connections:
            conn.abort()

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
