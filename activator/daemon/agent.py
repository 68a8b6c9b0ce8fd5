"""The balancer's agent endpoint (HAProxy agent-check): one line in (the service's name, `agent-send`), one line
out (core/agent.py decides it), then close.

A balancer's check is not a client: it wakes nothing, keeps nothing alive and is not counted as a connection.
Anyone who can reach the port learns each service's state and load here (as they could by timing its clients),
so bind it where only the balancers are (the example binds the host's own address; docs/multi-host.md).
A peer that sends nothing gets the answer for the only service (or `down` naming the need to send one) after
READ_TIMEOUT; a line longer than MAX_LINE is cut, so a flood of slow or large checks costs nothing lasting.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from activator.config.addresses import ListenAddress
from activator.core import agent

from .fleet import Fleet

log = logging.getLogger("activator")

READ_TIMEOUT = 1.0
MAX_LINE = 256


class Agent:
    def __init__(self, fleet: Fleet) -> None:
        self.fleet = fleet
        self.draining = False  # the daemon is stopping: every service says drain
        self._server: asyncio.Server | None = None

    @property
    def address(self) -> ListenAddress | None:
        """Where it answers (settings.agent.listen; read at startup, a reload does not move it)."""
        settings = self.fleet.config.settings.agent
        return settings.listen if settings is not None else None

    @property
    def name(self) -> str:
        return f"agent endpoint {self.address}"

    async def start(self) -> None:
        if (addr := self.address) is not None:
            self._server = await asyncio.start_server(self._answer, addr.host, addr.port, reuse_address=True,
                                                      limit=MAX_LINE)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 1)

    def state(self, name: str) -> agent.PoolState | None:
        svc = self.fleet.services.get(name)
        if svc is None:
            return None
        now = time.monotonic()
        serving = svc.checkpoint is not None and not svc.start_backoff.remaining(now)
        problem = ("no checkpoint: " + (svc.checkpoint_problem or "being built")) if svc.checkpoint is None else \
            "backing off after failed starts"
        ready = [i for i in svc.instances if not i.track.stopping and not i.track.withdrawn]
        return agent.PoolState(
            stopping=self.draining or svc.stopped or svc in self.fleet.retiring,
            serving=serving, problem=problem, ready_instances=len(ready),
            connections=sum(i.connections for i in ready), starting=svc.starting,
            target=svc.config.target_connections, max_instances=svc.max_instances)

    def reply(self, name: str) -> str:
        if not name and len(self.fleet.services) == 1:
            name = next(iter(self.fleet.services))
        if not name:
            return "down #send the service's name (HAProxy: agent-send \"NAME\\n\")"
        line = agent.reply(self.state(name), name)
        self.fleet.metrics.agent_checks.labels(name if name in self.fleet.services else "", line.split()[0]).inc()
        return line

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                raw = await asyncio.wait_for(reader.readline(), READ_TIMEOUT)
            except (TimeoutError, asyncio.LimitOverrunError, ValueError):
                raw = b""
            name = raw[:MAX_LINE].decode("ascii", errors="replace").strip()
            writer.write((self.reply(name) + "\n").encode())
            await asyncio.wait_for(writer.drain(), READ_TIMEOUT)
        except (TimeoutError, OSError):
            pass
        except Exception:  # one check must never take the endpoint down
            log.exception("agent check failed")
        finally:
            writer.close()
