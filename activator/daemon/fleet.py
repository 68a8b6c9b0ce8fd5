"""The running services and what serves them: each name's Service (its pool of instances), its listeners (its
listening sockets and what accepts on them: servicelisteners.py), the fleet's background tasks, the old
definitions still draining after a reload, and the host pieces they share (runc, the checkpoint builder and
store, the instance network, KSM, the restore slots, the descriptor budget).

One Fleet per daemon, owned by the lifecycle (server.py); reload orchestration (reloading.py), checkpoint builds
(builds.py), the background watchers (watchers.py) and the control commands (commands.py) take it explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import logging
import os
import socket
import time
from collections.abc import Callable
from typing import Any

from activator.checkpoints.host import Host
from activator.checkpoints.instance import InstanceLauncher
from activator.checkpoints.restoregate import RestoreGate
from activator.checkpoints.store import Checkpoint
from activator.config.addresses import ListenAddress
from activator.config.document import Config
from activator.config.service import ServiceConfig
from activator.core import capacity
from activator.errors import ActivatorError, ConfigError
from activator.net.network import HostNetwork, kernel_path_possible
from activator.runtime import cgroups, ksm, preflight
from activator.runtime.ksm import Ksm
from activator.statedir import StateDir
from activator.tasks import Tasks

from . import metrics, modes, systemd
from .handoff import HandoffMode
from .listening import ServiceListener
from .metrics import Metrics
from .proxy import ConnectionSet, client_protocol_factory
from .service import Service
from .servicelisteners import HandoffListener, TcpListener, UdpListener
from .sockets import address_of, take_all
from .udp import Unanswered

log = logging.getLogger("activator")

#: restores running at once, per CPU (the rest queue): see bench/scaleout.py
RESTORES_PER_CPU = 1
#: told when a service starts serving (problem None) or cannot (problem: why)
ServiceHook = Callable[[ServiceConfig, str | None], None]


class Fleet:
    def __init__(self, config: Config, state: StateDir, metrics: Metrics, *,
                 on_service: ServiceHook | None = None) -> None:
        self.config = config
        self.state = state
        self.metrics = metrics
        self.services: dict[str, Service] = {}
        self.connections = ConnectionSet()
        #: service -> its listeners (TCP, then UDP), started or about to be; stopped by unlisten
        self.listening: dict[str, list[ServiceListener]] = {}
        #: old definitions of changed services, and removed services, while their connections drain
        self.retiring: set[Service] = set()
        self.budget = capacity.Budget(0)
        self.from_systemd: dict[str, tuple[ListenAddress, ...]] = {}  # `listen: systemd` services' addresses
        self.restores = RestoreGate(max(2, RESTORES_PER_CPU * (os.cpu_count() or 1)))
        self.host: Host | None = None  # set at startup, once the host is checked and the state dir locked
        self.network_open = False  # from the moment open() starts (before it, the kernel path has nothing to count)
        self.ksm: Ksm | None = None
        self.ready = asyncio.Event()  # READY=1 was sent
        self.on_service = on_service
        #: a stateful service's checkpoint was used up by its instance (Builds makes it again)
        self.on_used_up: Callable[[ServiceConfig], None] | None = None
        self.started = time.time()
        self.tasks = Tasks()  # the background work: shutdown cancels and awaits it as one

    # --- the host pieces -----------------------------------------------------------------------------------

    @property
    def network(self) -> HostNetwork | None:
        return self.host.network if self.host is not None else None

    @property
    def listeners(self) -> dict[str, list[socket.socket]]:
        """Each service's listening sockets (a view: Fleet.serve and unlisten change them)."""
        return {name: [lst.sock for lst in group] for name, group in self.listening.items()}

    async def ksm_for(self, shares: bool) -> Ksm | None:
        """The Ksm a sharing service's launcher marks its instances for (started on first use), or None."""
        if shares and self.ksm is None:
            if ksm.available():
                self.ksm = Ksm(self.state.root / ksm.SAVED_NAME)
                await asyncio.to_thread(self.ksm.start)
                self.tasks.spawn(_pace_ksm(self.ksm), name="ksm-pacer")
            else:
                log.warning("share_memory is on but this kernel has no KSM (/sys/kernel/mm/ksm): nothing is shared")
        return self.ksm if shares else None

    def size_budget(self) -> None:
        """How many connections the open file limit leaves room for, across services."""
        fleet = self
        nofile = preflight.raise_nofile()
        fleet.budget.limit = capacity.connection_budget(nofile, preflight.open_fds(), len(fleet.config.services))
        if fleet.budget.limit < 16:
            raise ActivatorError(f"the open file limit ({nofile}) leaves room for {fleet.budget.limit} connections; "
                                 "raise it (ulimit -n, or LimitNOFILE= in the unit)")
        for svc in fleet.config.services:
            if svc.max_connections is not None and svc.max_connections > fleet.budget.limit:
                log.warning("service=%s max_connections %d is more than the open file limit (%d) allows: past "
                            "%d connections in all, clients are refused with reason=resources", svc.name,
                            svc.max_connections, nofile, fleet.budget.limit)

    def take_listeners(self, handed_in: list[socket.socket]) -> None:
        """The sockets systemd or the caller handed in, and the rest bound here; `listen: systemd` services get
        their sockets' addresses."""
        fleet = self
        from_systemd: dict[str, list[ListenAddress]] = {}
        taken: dict[str, list[socket.socket]] = {}
        for svc, sock in take_all(fleet.config, systemd.listen_fds() + [("", s) for s in handed_in]):
            taken.setdefault(svc.name, []).append(sock)
            if not svc.listen:
                from_systemd.setdefault(svc.name, []).append(address_of(sock))
        for name, socks in taken.items():
            self.add_listeners(name, socks)  # not started: start_listening, once the services exist
        fleet.from_systemd = {name: tuple(addrs) for name, addrs in from_systemd.items()}
        fleet.config = fleet.with_systemd_addresses(fleet.config)

    # --- services --------------------------------------------------------------------------------------------

    async def make_service(self, svc: ServiceConfig, config: Config, *, sweeps: bool = True) -> Service:
        """A Service with its InstanceLauncher (not yet serving: no listener, no checkpoint)."""
        assert self.host is not None
        m = self.metrics.for_service(svc.name)
        launcher = InstanceLauncher(svc, self.host.runc, self.state.instances, self.state.logs, m, self.network,
                                    await self.ksm_for(config.shares_memory(svc)), self.restores)
        service = Service(svc, launcher=launcher, metrics=m, budget=self.budget,
                          store=self.host.builder.store if sweeps else None)
        if self.on_used_up is not None:
            hook = self.on_used_up
            service.used_up = lambda: hook(svc)
        return service

    def service(self, name: str) -> Service:
        svc = self.services.get(name)
        if svc is None:
            raise ActivatorError(f"no service named '{name}' (known: {', '.join(self.services) or 'none'})")
        return svc

    def with_systemd_addresses(self, config: Config) -> Config:
        """`listen: systemd` services, with the addresses of the sockets systemd passed for them at start."""
        services = []
        for svc in config.services:
            if not svc.listen:
                if svc.name not in self.from_systemd:
                    raise ConfigError(f"{config.path}: services.{svc.name}.listen: systemd passes sockets only at "
                                      "start; restart the service to take new ones")
                svc = dataclasses.replace(svc, listen=self.from_systemd[svc.name])
            services.append(svc)
        return dataclasses.replace(config, services=tuple(services))

    def limit(self, svc: ServiceConfig) -> None:
        """The service's kernel-side counters, max_connections and connection timeouts, before its first
        connection is accepted."""
        if self.network is not None and kernel_path_possible(svc):
            self.network.limit(svc.name, svc.listen, svc.max_connections, svc.client_idle_timeout,
                               svc.udp_flow_timeout if "udp" in svc.protocol else None, svc.udp_reply_ratio,
                               handoff=svc.handoff)

    def reconfigure(self, svc: ServiceConfig) -> None:
        """A reload that changes only what the running service reads at decision time (core.reloadplan.IN_PLACE):
        the service, its launcher and its kernel limit take the new definition; its instances stay."""
        service = self.services[svc.name]
        old = service.config
        service.reconfigure(svc)
        if isinstance(service.launcher, InstanceLauncher):  # restore_timeout is read from it at each restore
            service.launcher.config = svc
        if self.on_used_up is not None:
            hook = self.on_used_up
            service.used_up = lambda: hook(svc)
        if (old.max_connections, old.client_idle_timeout) != (svc.max_connections, svc.client_idle_timeout):
            self.limit(svc)

    def use(self, svc: ServiceConfig, checkpoint: Checkpoint) -> None:
        """Hand a service its checkpoint, and its steering mode (modes.py): its socket handed to its apps
        (handoff), a steering rule if the app can be reached on its own address (kernel), else userspace."""
        service = self.services[svc.name]
        listener = self._handoff_listener(svc)
        if listener is not None:
            service.launcher.listener = listener
        context = self._mode_context(svc, checkpoint, listener)
        entry = modes.choose(context)
        if service.mode.name != entry.name:
            service.switch_mode(entry.make(context))
        service.set_checkpoint(checkpoint)

    def _mode_context(self, svc: ServiceConfig, checkpoint: Checkpoint,
                      listener: socket.socket | None) -> modes.ModeContext:
        name = svc.name
        return modes.ModeContext(
            svc, checkpoint, self.network, listener, self.metrics,
            accepting=lambda on: self.accepting(name, on),
            replace_socket=lambda why: self._replace_later(name, why),
            listening_again=lambda: self.listening_again(name))

    def _handoff_listener(self, svc: ServiceConfig) -> socket.socket | None:
        if not svc.handoff:
            return None
        socks = self.listeners.get(svc.name, [])
        if len(socks) != 1:  # `listen: systemd` with several sockets (a listen list is refused by the config)
            log.warning("service=%s handoff needs one listening socket, it has %d: not handed off", svc.name,
                        len(socks))
            return None
        if not cgroups.direct():
            log.warning("service=%s handoff needs restores through CRIU directly (cgroup v1 device files or a v2 "
                        "device program), which this host cannot do: its connections take the activator's other "
                        "paths", svc.name)
            return None
        return socks[0]

    def link_dependencies(self) -> None:
        """depends_on as Service objects, after every change to the set of services (a start, a reload, a
        changed service taking over)."""
        for svc in self.services.values():
            svc.dependants = []
        for svc in self.services.values():
            svc.dependencies = [self.services[d] for d in svc.config.depends_on if d in self.services]
            for dep in svc.dependencies:
                dep.dependants.append(svc)

    # --- listening -------------------------------------------------------------------------------------------

    def add_listeners(self, name: str, socks: list[socket.socket]) -> list[ServiceListener]:
        """Listeners for these sockets of a service, not yet started (unlisten stops them all the same), that
        accept for whichever Service holds the name at the time (a reload swaps it)."""

        def current() -> Service:
            return self.services[name]

        factory = client_protocol_factory(current, self.connections)
        service = self.services.get(name)
        handoff = service.config.handoff if service is not None else \
            next((s.handoff for s in self.config.services if s.name == name), False)
        group = self.listening.setdefault(name, [])
        # a handoff service's new socket waits while its apps accept from the one it has (accepting())
        on = all(lst.on for lst in group if isinstance(lst, HandoffListener))
        unanswered = Unanswered()  # one budget of unanswered UDP flows for the service's addresses
        made: list[ServiceListener] = []
        for sock in socks:
            if sock.type == socket.SOCK_DGRAM:
                made.append(UdpListener(name, sock, current, unanswered))
            elif handoff:
                made.append(HandoffListener(name, sock, factory, self.tasks, on=on))
            else:
                made.append(TcpListener(name, sock, factory))
        group.extend(made)
        return made

    async def start_listening(self, name: str) -> None:
        """Start the service's listeners taken at startup (take_listeners)."""
        for lst in self.listening.get(name, []):
            await lst.start()

    async def serve(self, name: str, socks: list[socket.socket]) -> None:
        """Accept on these sockets too (a reload's new addresses)."""
        for lst in self.add_listeners(name, socks):
            await lst.start()

    def handoff_listeners(self, name: str) -> list[HandoffListener]:
        return [lst for lst in self.listening.get(name, []) if isinstance(lst, HandoffListener)]

    def accepts(self, name: str) -> bool:
        """Whether the activator accepts on the handoff service's sockets now (not while its apps do)."""
        return all(lst.on for lst in self.handoff_listeners(name))

    def accepting(self, name: str, on: bool) -> None:
        """Accept on a handoff service's sockets or not (handoff.py: not while an app accepts from them).

        Not an asyncio server closed and made again: a server closes its descriptor, and epoll keeps watching a
        socket until every descriptor of it is closed (the apps hold it), so a server made again on a duplicate
        was never told of a connection (seen with uvloop). Nor a reader on the loop: an app can make the socket
        blocking at any time (acceptor.py)."""
        for lst in self.handoff_listeners(name):
            lst.accepting(on)

    def listening_again(self, name: str) -> None:
        """A handoff service's socket, shut down by an app (accept() EINVAL: its thread waits), listens again
        (handoff.HandoffMode.keep_listening)."""
        for lst in self.handoff_listeners(name):
            lst.kick()

    def _replace_later(self, name: str, what: str) -> None:
        self.tasks.spawn(self.replace_socket(name, what), name=f"replace-socket:{name}")

    async def replace_socket(self, name: str, what: str) -> None:
        """An app made a handoff service's socket deaf for every holder, for good (handoff.py: a socket filter, a
        locked one cannot be taken off; a device binding; TCP-MD5 keys). Every instance of the service is killed
        (any may have done it, and each holds the socket), and the socket replaced by a fresh one on the same
        address, bound as the old one was; the service's next connection restores a new instance with that one."""
        service = self.services[name]
        mode = service.mode
        if not isinstance(mode, HandoffMode) or mode.replacing:
            return
        mode.replacing = True
        old = mode.listener
        address = address_of(old)
        self.metrics.handoff_replaced.labels(name).inc()
        log.warning("service=%s its listening socket %s was made deaf for every holder, for good, by an app it "
                    "was handed to (%s): its instances are killed and the socket replaced", name, address, what)
        for lst in self.handoff_listeners(name):
            lst.stop_accepting()
        await service.launcher.rehand(None)  # no restore gets the old socket from here on
        await service.kill_all("its service's listening socket is replaced")
        # Out of LISTEN (a thread of ours waiting in accept() on it wakes) and reusable: the app may have cleared
        # SO_REUSEADDR, and a slot's CRIU, until released, still holds it.
        with contextlib.suppress(OSError):
            old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            old.shutdown(socket.SHUT_RDWR)
        try:
            fresh = await self._bind_again(old, mode.backlog, mode.device)
        except OSError as e:
            log.error("service=%s its listening socket %s could not be replaced (%s; a socket unit's copy still "
                      "holds the address? restart it, or activator): the service cannot be reached", name, address,
                      e.strerror)
            return
        self.listening[name] = [lst for lst in self.listening.get(name, []) if lst.sock is not old]
        old.close()
        checkpoint = service.checkpoint
        assert checkpoint is not None  # a handoff mode is chosen with one
        context = self._mode_context(service.config, checkpoint, fresh)
        service.switch_mode(modes.choose(context).make(context))
        await self.serve(name, [fresh])
        service.mode.set(list(service.instances), service.starting)
        await service.launcher.rehand(fresh)
        log.info("service=%s listening on a fresh socket %s", name, address)

    @staticmethod
    async def _bind_again(old: socket.socket, backlog: int, device: str | None) -> socket.socket:
        """A new listening socket on old's address, bound as it was bound (its device, as the mode recorded it
        before any app had it; IPV6_V6ONLY, which nobody can change on a bound socket). The instances' processes
        are gone, but the kernel may take a moment to let the last reference go: tried for a second."""
        host, port = old.getsockname()[:2]
        family = old.family
        v6only = old.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) if family == socket.AF_INET6 else None
        for attempt in range(20):
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if v6only is not None:
                    sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, v6only)
                if device is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, device.encode())
                sock.bind((host, port))
                sock.listen(backlog)
                sock.setblocking(False)
                return sock
            except OSError as e:
                sock.close()
                if e.errno != errno.EADDRINUSE or attempt == 19:
                    raise
            await asyncio.sleep(0.05)
        raise AssertionError("unreachable")

    async def unlisten(self, name: str, keep: tuple[socket.socket, ...] = ()) -> None:
        """Stop accepting on the service's sockets, except those kept (a changed service's unchanged addresses)."""
        kept = []
        failed: Exception | None = None
        for lst in self.listening.pop(name, []):
            if lst.sock in keep:
                kept.append(lst)
                continue
            try:
                await lst.stop()
            except Exception as e:  # the others are still stopped
                failed = failed or e
        if kept:
            self.listening[name] = kept
        if failed is not None:
            raise failed

    # --- old definitions -------------------------------------------------------------------------------------

    def withdraw(self, old: Service, *, removed: bool) -> None:
        """An old definition leaves the kernel path and its gauges; it keeps serving the connections it has."""
        old.m = metrics.detached(old.m)
        old.store = None  # it must not sweep the checkpoint a new definition may be using
        old.withdraw_all()
        old.mode.stop()
        if self.network is not None:
            self.network.forget(old.name, counters=removed)
        self.retiring.add(old)

    async def drain_and_close(self, old: Service, *, removed: bool, then: Service | None = None) -> None:
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
            self.retiring.discard(old)
        if removed and old.name not in self.services:
            self.metrics.forget_service(old.name)
        if then is not None and then is self.services.get(old.name) and self.host is not None:
            then.store = self.host.builder.store
            then.sweep_if_unused()
        log.info("service=%s %s", old.name, "removed" if removed else "old definition drained and closed")

    # --- what it says about itself ---------------------------------------------------------------------------

    def service_state(self, svc: ServiceConfig) -> str:
        addrs = " ".join(str(a) for a in svc.listen)
        service = self.services.get(svc.name)
        if service is None or service.checkpoint is not None:
            return f"{svc.name} serving on {addrs}"
        if service.checkpoint_problem is not None:
            return f"{svc.name} NOT serving on {addrs}: no checkpoint ({service.checkpoint_problem})"
        return f"{svc.name} on {addrs}: checkpoint being built (its connections wait for it)"

    def status_line(self) -> str:
        broken = [s.name for s in self.services.values() if s.checkpoint_problem]
        status = f"serving {len(self.services) - len(broken)} service(s)"
        if broken:
            status += f"; without a checkpoint (retrying): {', '.join(broken)}"
        if self.retiring:
            status += f"; draining {len(self.retiring)} old definition(s)"
        return status

    def status(self) -> dict[str, Any]:
        return {
            "pid": os.getpid(),
            "config": str(self.config.path),
            "uptime_seconds": round(time.time() - self.started, 1),
            "ready": self.ready.is_set(),
            "connection_budget": self.budget.limit,
            "services": [s.status() for s in self.services.values()],
            # old definitions (a reload removed or changed them) still finishing their connections
            "retiring": sorted(s.name for s in self.retiring),
        }

    # --- connections on both paths ---------------------------------------------------------------------------

    async def kernel_open(self) -> int:
        """Connections open on the kernel path right now (0 without a network, or when it cannot be asked)."""
        if self.network is None or not self.network_open:
            return 0
        try:
            samples = await asyncio.to_thread(self.network.sample)
        except Exception:
            return 0
        return sum(s.open for s in samples.by_mark.values())

    async def drained(self) -> None:
        """Until no connection is open on either path."""
        while True:
            await self.connections.wait_empty()
            if not await self.kernel_open():
                return
            await asyncio.sleep(0.1)


async def _pace_ksm(k: Ksm) -> None:
    while True:
        await asyncio.sleep(5)
        k.tick()
