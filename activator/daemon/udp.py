"""UDP services (`protocol: udp`): the activator's datagram socket on each listen address, and its flows.

A flow is one client address and port. Its first datagram admits it like a TCP connection (a Lease: counted,
refused by the same admission control, and waking the service when no instance can take it); it and the
datagrams that follow are held, at most udp_queue of them (the rest dropped and counted), and delivered in order
once an instance is there. From then on the flow is relayed through a UDP socket the activator opens inside the
instance's network namespace (so the app sees it come from 127.0.0.1, as a held TCP connection does), and the
app's replies go back out of the listening socket: the client hears them from the address it sent to.

Only flows that began while the activator had to hold them take this path. Once an instance runs and the service
is on the kernel path, new flows are DNATed to an instance by the kernel (net/network.py), one conntrack entry
each: a flow is never split between instances, and its idleness is conntrack's (udp_flow_timeout). A relayed flow
with no datagram either way for udp_flow_timeout ends: its lease is released (so its instance can go idle), and
the host's conntrack entry for it is deleted, so that the client's next datagram starts a new flow, which the
kernel path may take."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from activator.errors import Rejected
from activator.net.network import forget_udp_flow
from activator.tasks import spawn

from .service import Lease, Service

log = logging.getLogger("activator")

Address = tuple[Any, ...]


class _Backend(asyncio.DatagramProtocol):
    """The flow's socket inside the instance: what the app answers goes back to the client."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.flow.reply(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from the instance (its app not bound yet, or gone): the datagram is lost, as it
        # would be on the wire; counted, and the flow goes on.
        self.flow.front.service().m.connection_errors.inc()


class Flow:
    def __init__(self, front: UdpFront, addr: Address, lease: Lease) -> None:
        self.front = front
        self.addr = addr
        self.lease = lease
        self.queue: collections.deque[bytes] = collections.deque()
        self.backend: asyncio.DatagramTransport | None = None
        self.last = self.started = time.monotonic()
        self.closed = False
        self._timer: asyncio.TimerHandle | None = None
        self._task = spawn(self._connect(), name=f"udp-flow:{front.service().name}")

    def datagram(self, data: bytes) -> None:
        self.last = time.monotonic()
        svc = self.front.service()
        svc.m.bytes_in.inc(len(data))
        if self.backend is not None:
            self.backend.sendto(data)
        elif len(self.queue) < svc.config.udp_queue:
            self.queue.append(data)
        else:
            svc.m.udp_dropped.inc()

    def reply(self, data: bytes) -> None:
        self.last = time.monotonic()
        self.front.service().m.bytes_out.inc(len(data))
        self.front.send(data, self.addr)

    async def _connect(self) -> None:
        svc = self.front.service()
        try:
            inst, waited = await self.lease.acquire()
            sock = inst.sandbox.netns.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.connect(("127.0.0.1", svc.config.port))  # no handshake: only fixes the peer
                transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(
                    lambda: _Backend(self), sock=sock)
            except BaseException:
                sock.close()
                raise
        except asyncio.CancelledError:
            self.close()
            raise
        except Rejected as e:
            svc.reject(e)
            svc.m.udp_dropped.inc(len(self.queue))
            self.close()
            return
        except Exception as e:
            svc.m.connection_errors.inc()
            log.warning("service=%s UDP flow from %s could not be served: %s", svc.name, self.addr[0], e)
            self.close()
            return
        if self.closed:
            transport.close()
            return
        self.lease.connected()
        self.backend = transport
        if waited:
            svc.m.first_connection_wait.observe(time.monotonic() - self.started)
        while self.queue:  # in the order they came; nothing new can interleave (no await in between)
            transport.sendto(self.queue.popleft())
        self._arm(svc.config.udp_flow_timeout)

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        timeout = self.front.service().config.udp_flow_timeout
        left = self.last + timeout - time.monotonic()
        if left > 0.001:
            self._arm(left)
            return
        self.close()
        self.front.ended(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._timer is not None:
            self._timer.cancel()
        if self.backend is not None:
            self.backend.close()
        if not self._task.done():
            self._task.cancel()
        self.lease.release()
        self.front.flows.pop(self.addr, None)


class UdpFront(asyncio.DatagramProtocol):
    """One UDP listen address of a service, for whichever Service holds the name at the time (a reload swaps
    it): its flows by client address."""

    def __init__(self, service: Callable[[], Service], port: int) -> None:
        self.service = service
        self.port = port  # the listen address's
        self.flows: dict[Address, Flow] = {}
        self.transport: asyncio.DatagramTransport | None = None
        self._forgetting: set[asyncio.Task[Any]] = set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's do not subclass asyncio's

    def datagram_received(self, data: bytes, addr: Address) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            svc = self.service()
            try:
                lease = svc.admit()
            except Rejected as e:
                svc.reject(e)
                svc.m.udp_dropped.inc()
                return
            svc.m.connections.inc()
            flow = self.flows[addr] = Flow(self, addr, lease)
        flow.datagram(data)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for a reply we sent (the client went away): nothing to do

    def send(self, data: bytes, addr: Address) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def ended(self, flow: Flow) -> None:
        """A relayed flow is over: its conntrack entry goes, so the client's next datagram is a new flow."""
        task = spawn(self._forget(flow.addr), name="udp-forget")
        self._forgetting.add(task)
        task.add_done_callback(self._forgetting.discard)

    async def _forget(self, addr: Address) -> None:
        with contextlib.suppress(Exception):  # best effort: at worst the entry times out on its own
            await asyncio.to_thread(forget_udp_flow, (str(addr[0]), int(addr[1])), self.port)

    def close(self) -> None:
        for flow in list(self.flows.values()):
            flow.close()
        if self.transport is not None:
            self.transport.close()
