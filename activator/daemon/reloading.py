"""Carrying out a reload (SIGHUP, `systemctl reload`, `activator reload`): what core/reloadplan.py decided, done to
the running fleet. New listeners are bound first (a port in use refuses the whole reload, nothing changed),
removed services stop accepting and drain, added ones start as at startup, changed ones take the new definition
in place when only what their decisions read changed (core/reloadplan.py IN_PLACE: no instance is replaced), or
else get their new checkpoint while the old definition keeps serving, then take over the listeners; the old
instances finish their connections and go. Unchanged services are not touched. A refused reload leaves the running
configuration as it was.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

from activator.checkpoints.host import load_trust
from activator.config.document import Config
from activator.config.parse import load_config
from activator.core.reloadplan import Change, Plan, plan_reload
from activator.errors import ActivatorError, ConfigError

from . import systemd
from .builds import Builds
from .fleet import Fleet
from .sockets import bind_listener, udp_sockets

log = logging.getLogger("activator")


class Reloader:
    def __init__(self, fleet: Fleet, builds: Builds) -> None:
        self.fleet = fleet
        self.builds = builds
        self._lock = asyncio.Lock()
        self._pending: dict[str, asyncio.Task[Any]] = {}  # a reload's unfinished work, per service

    async def plan(self, path: str = "") -> dict[str, Any]:
        """What reloading `path` (default: the running file) would change; raises ConfigError if refused."""
        new = await self._read_config(path or self.fleet.config.path)
        return {"config": str(new.path), "changes": plan_reload(self.fleet.config, new).describe()}

    async def reload(self) -> dict[str, Any]:
        """Re-read the running file and apply it. One at a time."""
        async with self._lock:
            systemd.notify("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}",
                           "STATUS=reloading the configuration")
            try:
                return await self._reload()
            finally:
                systemd.notify("READY=1", f"STATUS={self.fleet.status_line()}")

    async def _read_config(self, path: str | Path) -> Config:
        return self.fleet.with_systemd_addresses(await asyncio.to_thread(load_config, path))

    async def _reload(self) -> dict[str, Any]:
        fleet = self.fleet
        try:
            new = await self._read_config(fleet.config.path)
            p = plan_reload(fleet.config, new)
            # New trusted keys or signing key: read and checked before anything changes (one line if unusable).
            trust = await asyncio.to_thread(load_trust, new) if "checkpoint_trust" in p.settings else None
            fresh = await asyncio.to_thread(self._bind_new, p, new)
        except ActivatorError as e:
            fleet.metrics.reloads.labels("refused").inc()
            log.error("reload refused, the running configuration stays: %s", e)
            raise
        # A change still being prepared (its checkpoint building) for a service this plan removes or changes
        # again is superseded: stop it first (what it had swapped in already drains on its own).
        for name in {s.name for s in p.removed} | {c.new.name for c in p.changed}:
            pending = self._pending.get(name)
            if pending is not None and not pending.done():
                pending.cancel()
                await asyncio.wait([pending])
        fleet.config = new
        if trust is not None and fleet.host is not None:
            fleet.host.builder.exchange.trust, fleet.host.builder.exchange.sign_key = trust
        for svc in p.removed:
            old = fleet.services.pop(svc.name)
            await fleet.unlisten(svc.name)
            fleet.withdraw(old, removed=True)
            fleet.tasks.spawn(fleet.drain_and_close(old, removed=True), name=f"retire:{svc.name}")
        for svc in p.added:
            fleet.services[svc.name] = await fleet.make_service(svc, new)
            fleet.limit(svc)
            await fleet.serve(svc.name, fresh.get(svc.name, []))
            self._track(svc.name, self.builds.first(svc), "checkpoint")
        for change in p.changed:
            name = change.new.name
            # In place only over the definition the service really runs: a superseded replace (cancelled above)
            # left it on an older one, which may differ in more than these keys.
            if change.in_place and fleet.services[name].config == change.old:
                fleet.reconfigure(change.new)
                continue
            if change.in_place:
                log.info("service=%s replaced rather than changed in place: an earlier reload's change to it was "
                         "still being prepared", name)
            self._track(name, self._replace(change, fresh.get(name, [])), "replace")
        for name, shares in p.resharing:
            await fleet.services[name].launcher.reshare(await fleet.ksm_for(shares))
        fleet.link_dependencies()
        for note in new.notes:
            log.info("%s: %s", new.path, note)
        fleet.metrics.reloads.labels("applied").inc()
        lines = p.describe()
        log.info("reloaded %s: %s", new.path, "; ".join(lines))
        return {"config": str(new.path), "changes": lines}

    def _track(self, name: str, coro: Coroutine[Any, Any, None], what: str) -> None:
        """A reload's work for one service, which a later reload may supersede (_reload cancels it)."""
        task = self.fleet.tasks.spawn(coro, name=f"{what}:{name}")
        self._pending[name] = task
        task.add_done_callback(lambda t: self._pending.pop(name, None) if self._pending.get(name) is t else None)

    def _bind_new(self, p: Plan, new: Config) -> dict[str, list[socket.socket]]:
        """Sockets for every listen address the new file has and the running one does not. All or none."""
        for c in p.changed:
            if c.old.handoff != c.new.handoff and set(c.old.listen) & set(c.new.listen):
                # its socket is accepted on by an asyncio server or by an acceptor thread (servicelisteners.py),
                # and a live socket cannot move from one to the other
                raise ConfigError(f"{new.path}: services.{c.new.name}.handoff cannot change on a reload while the "
                                  "service keeps its listen address; restart activator to change it")
        bound: dict[str, list[socket.socket]] = {}
        try:
            for svc in (*p.added, *(c.new for c in p.changed)):
                have = self.fleet.listeners.get(svc.name, [])
                for addr in svc.listen if "tcp" in svc.protocol else ():
                    if not any(systemd.same_address(sock, addr) for sock in have):
                        bound.setdefault(svc.name, []).append(bind_listener(addr, svc, new))
                if udp := udp_sockets(svc, new, have):
                    bound.setdefault(svc.name, []).extend(udp)
        except BaseException:
            for socks in bound.values():
                for sock in socks:
                    sock.close()
            raise
        return bound

    async def _replace(self, change: Change, fresh: list[socket.socket]) -> None:
        """A changed service: its new definition gets its checkpoint while the old one serves, then takes over the
        listeners; the old instances drain. If the new checkpoint cannot be made, the old definition stays."""
        fleet = self.fleet
        assert fleet.host is not None
        name, svc = change.new.name, change.new
        old = fleet.services[name]
        try:
            checkpoint, source = await fleet.host.builder.ensure(svc)
        except asyncio.CancelledError:  # superseded by a later reload: nothing was swapped in yet
            for sock in fresh:
                sock.close()
            raise
        except ActivatorError as e:
            for sock in fresh:
                sock.close()
            fleet.config = dataclasses.replace(
                fleet.config, services=tuple(change.old if s.name == name else s for s in fleet.config.services))
            old.m.checkpoint_build_failures.inc()
            log.error("service=%s keeps its previous definition: the new one's checkpoint failed: %s", name, e)
            return
        if source == "built":
            log.info("service=%s new checkpoint built in %.1fs for its new definition", name,
                     checkpoint.build_seconds)
            self.builds.share(svc)
        # The old instances still mount the replaced checkpoint: nothing may sweep it until they are gone.
        new = await fleet.make_service(svc, fleet.config, sweeps=False)
        new.take_counters_from(old)
        fleet.services[name] = new  # from here the listeners hand new connections to it
        fleet.link_dependencies()
        fleet.withdraw(old, removed=False)
        fleet.limit(svc)
        def kept(sock: socket.socket) -> bool:  # a TCP socket for a TCP address, a UDP one for a UDP address
            proto = "udp" if sock.type == socket.SOCK_DGRAM else "tcp"
            return proto in svc.protocol and any(systemd.same_address(sock, a, sock.type) for a in svc.listen)

        keep = tuple(sock for sock in fleet.listeners.get(name, []) if kept(sock))
        await fleet.unlisten(name, keep)
        made = fleet.add_listeners(name, fresh)
        fleet.use(svc, checkpoint)  # after the listeners: with handoff, its apps get the new definition's socket
        for listener in made:
            await listener.start()
        # Not part of this task: a later reload may cancel a change being prepared, never a drain.
        fleet.tasks.spawn(fleet.drain_and_close(old, removed=False, then=new), name=f"retire:{name}")
