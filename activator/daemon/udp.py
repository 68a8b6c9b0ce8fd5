"""UDP services (`protocol: udp`): the activator's datagram socket on each listen address, and its flows.

A flow is one client address and port, and anyone can send a datagram with any source address: a flow is not a
connection until the app has answered it. Its first datagram wakes the service if nothing runs (the product: it
and the datagrams that follow are held, at most udp_queue of them and udp_held_bytes for the whole service, the
rest dropped and counted, and delivered in order once an instance is there), but until the app answers the flow
claims nothing: it does not keep the instance, count toward scale-out, max_connections or max_waiting, and it
ends UNANSWERED_TIMEOUT after its datagrams were delivered. A service has at most SERVICE_FLOWS unanswered flows
and a client address SOURCE_FLOWS of them; a new one past either ends the oldest (so a flood of forged sources
churns its own flows, and a real client's still reaches the app). The app's first answer makes the flow a
connection (a Lease: admission control, the descriptor budget, the instance's count) until it is quiet for
udp_flow_timeout.

Delivered flows are relayed through a UDP socket the activator opens inside the instance's network namespace (so
the app sees it come from 127.0.0.1, as a held TCP connection does), and the app's replies go back out of the
listening socket: the client hears them from the address it sent to. The replies a client gets are bounded by
udp_reply_ratio times the bytes it sent (RFC 9000 section 8's anti-amplification rule; it sending again owes it
more): past that they are dropped and counted, so a forged source cannot turn the app into a reflector.

Only flows that began while the activator had to hold them take this path. Once an instance runs and the service
is on the kernel path, new flows are DNATed to an instance by the kernel (net/network.py), one conntrack entry
each, with the same rules in nftables: counted once answered, unanswered ones gone after UNANSWERED_TIMEOUT,
replies bounded by the ratio. When a relayed flow ends, the host's conntrack entry for it is deleted, so that the
client's next datagram starts a new flow, which the kernel path may take."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from activator.checkpoints.instance import Instance
from activator.errors import Rejected
from activator.net.network import UNANSWERED_TIMEOUT, forget_udp_flow
from activator.tasks import spawn

from . import activation
from .lease import Lease
from .service import Service

log = logging.getLogger("activator")

Address = tuple[Any, ...]

#: ended flows waiting for their host conntrack entries to be deleted, per listen address; past it they time out
FORGET_QUEUE = 256
#: unanswered flows one client address may have per service: a resolver's are a handful (one per query in flight)
SOURCE_FLOWS = 64
#: unanswered flows per service: each holds a descriptor once delivered, and its datagrams while held
SERVICE_FLOWS = 1024


class Unanswered:
    """A service's flows the app has not answered (across its listen addresses), oldest first, and the bytes
    their held datagrams take."""

    def __init__(self) -> None:
        self.flows: dict[Flow, None] = {}  # insertion order: oldest first
        self.by_source: dict[str, dict[Flow, None]] = {}
        self.held = 0

    def add(self, flow: Flow) -> None:
        """Room for a new flow: the oldest of its source past SOURCE_FLOWS, the service's past SERVICE_FLOWS end."""
        mine = self.by_source.setdefault(flow.source, {})
        while len(mine) >= SOURCE_FLOWS:
            next(iter(mine)).end(evicted=True)
        while len(self.flows) >= SERVICE_FLOWS:
            next(iter(self.flows)).end(evicted=True)
        self.flows[flow] = None
        self.by_source.setdefault(flow.source, {})[flow] = None

    def remove(self, flow: Flow) -> None:
        self.flows.pop(flow, None)
        mine = self.by_source.get(flow.source)
        if mine is not None:
            mine.pop(flow, None)
            if not mine:
                del self.by_source[flow.source]


class _Backend(asyncio.DatagramProtocol):
    """The flow's socket inside the instance: what the app answers goes back to the client."""

    def __init__(self, flow: Flow) -> None:
        self.flow = flow

    def datagram_received(self, data: bytes, addr: Address) -> None:
        self.flow.reply(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable from the instance (its app not bound yet, or gone): the datagram is lost, as it
        # would be on the wire; counted, and the flow goes on.
        self.flow.svc.m.connection_errors.inc()


class Flow:
    def __init__(self, front: UdpFront, addr: Address, svc: Service) -> None:
        self.front = front
        self.addr = addr
        self.source = str(addr[0])
        self.svc = svc  # the definition it began under (a reload swaps front.service(), not this)
        self.lease: Lease | None = None  # once the app has answered: a connection
        self.instance: Instance | None = None  # where its datagrams go
        self.queue: collections.deque[bytes] = collections.deque()
        self.backend: asyncio.DatagramTransport | None = None
        self.credit = 0.0  # reply bytes the client is owed (udp_reply_ratio times what it sent, less what it got)
        self.last = self.started = time.monotonic()
        self.delivered = 0.0  # when its held datagrams went to the app
        self.closed = False
        self._budgeted = True  # the descriptor its backend socket takes, from the daemon's budget (taken by the front)
        self._timer: asyncio.TimerHandle | None = None
        front.unanswered.add(self)
        self._task = spawn(self._connect(), name=f"udp-flow:{svc.name}")

    def datagram(self, data: bytes) -> None:
        self.last = time.monotonic()
        svc = self.svc
        svc.m.bytes_in.inc(len(data))
        self.credit += svc.config.udp_reply_ratio * len(data)
        if self.backend is not None:
            self.backend.sendto(data)
            return
        held = self.front.unanswered
        if len(self.queue) < svc.config.udp_queue and held.held + len(data) <= svc.config.udp_held_bytes:
            self.queue.append(data)
            held.held += len(data)
        else:
            svc.m.udp_dropped.inc()

    def reply(self, data: bytes) -> None:
        if self.closed or (self.lease is None and not self._answered()):
            return
        svc = self.svc
        if len(data) > self.credit:  # more than the client is owed: maybe aimed at a forged source
            svc.m.udp_replies_dropped.inc()
            return
        self.credit -= len(data)
        self.last = time.monotonic()
        svc.m.bytes_out.inc(len(data))
        self.front.send(data, self.addr)

    def _answered(self) -> bool:
        """The app's first answer: the flow becomes a connection, counted on its instance. False if admission
        control refuses it now (the flow ends)."""
        svc, inst = self.svc, self.instance
        assert inst is not None
        self.front.unanswered.remove(self)
        self._give_budget()  # admit() takes it again, with everything else a connection counts
        try:
            lease = svc.admit()
        except Rejected as e:  # answered, but no room for one more connection (max_connections, descriptors)
            svc.reject(e)
            self.close()
            self.front.ended(self)
            return False
        self.lease = lease
        if not lease.claim(inst):  # its instance is going away: this answer was its last word
            self.end()
            return False
        lease.connected()
        svc.m.connections.inc()
        return True

    async def _connect(self) -> None:
        transport = await activation.activate(self.svc, self, self._reach, what=f"UDP flow from {self.addr[0]}",
                                              since=self.started, log=log)
        if transport is None:
            return
        self.backend = transport
        self.delivered = time.monotonic()
        self.front.unanswered.held -= sum(len(d) for d in self.queue)
        while self.queue:  # in the order they came; nothing new can interleave (no await in between)
            transport.sendto(self.queue.popleft())
        self._arm(min(UNANSWERED_TIMEOUT, self.svc.config.udp_flow_timeout))

    async def _reach(self) -> tuple[asyncio.DatagramTransport, bool]:
        """A socket to the app in an instance, claimed by nothing (service.unclaimed). Raises Rejected."""
        inst, waited = await self.svc.unclaimed()
        sock = inst.sandbox.netns.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            sock.connect(("127.0.0.1", self.svc.config.port))  # no handshake: only fixes the peer
            transport, _ = await asyncio.get_running_loop().create_datagram_endpoint(lambda: _Backend(self), sock=sock)
        except BaseException:
            sock.close()
            raise
        self.instance = inst
        return transport, waited

    def turned_away(self, why: Rejected | None) -> None:
        self.end()  # a datagram has no refusal to send: the flow ends, its held datagrams dropped (counted)

    def _arm(self, delay: float) -> None:
        self._timer = asyncio.get_running_loop().call_later(delay, self._check)

    def _check(self) -> None:
        timeout = self.svc.config.udp_flow_timeout
        # Unanswered: gone UNANSWERED_TIMEOUT after delivery, whatever the client sends (a forged source may
        # keep sending); answered: once quiet both ways for udp_flow_timeout.
        ends = self.last + timeout if self.lease is not None else \
            self.delivered + min(UNANSWERED_TIMEOUT, timeout)
        left = ends - time.monotonic()
        if left > 0.001:
            self._arm(left)
            return
        self.end()

    def end(self, *, evicted: bool = False) -> None:
        """Over: closed, and its conntrack entry deleted so the client's next datagram is a new flow."""
        if self.closed:
            return
        if self.lease is None:
            self.svc.m.udp_unanswered.inc()
        self.svc.m.udp_dropped.inc(len(self.queue))
        self.close()
        self.front.ended(self)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.front.unanswered.remove(self)
        self.front.unanswered.held -= sum(len(d) for d in self.queue)
        self.queue.clear()
        if self._timer is not None:
            self._timer.cancel()
        if self.backend is not None:
            self.backend.close()
        if not self._task.done():
            self._task.cancel()
        self._give_budget()
        if self.lease is not None:
            self.lease.release()
        self.front.flows.pop(self.addr, None)

    def _give_budget(self) -> None:
        if self._budgeted:
            self._budgeted = False
            self.svc.budget.give()


class UdpFront(asyncio.DatagramProtocol):
    """One UDP listen address of a service, for whichever Service holds the name at the time (a reload swaps
    it): its flows by client address. A service's fronts share one Unanswered."""

    def __init__(self, service: Callable[[], Service], port: int, unanswered: Unanswered | None = None) -> None:
        self.service = service
        self.port = port  # the listen address's
        self.unanswered = unanswered if unanswered is not None else Unanswered()
        self.flows: dict[Address, Flow] = {}
        self.transport: asyncio.DatagramTransport | None = None
        # Ended flows whose host conntrack entries wait to be deleted, oldest first, bounded; one task deletes them
        # one at a time on a thread of its own: a flood of flows must neither queue unbounded work nor take the
        # shared thread pool every restore of every service needs (each delete is a netlink dump, ~10 ms).
        self._to_forget: dict[Address, None] = {}
        self._forgetter: asyncio.Task[None] | None = None
        self._forget_pool: concurrent.futures.ThreadPoolExecutor | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's do not subclass asyncio's

    def datagram_received(self, data: bytes, addr: Address) -> None:
        flow = self.flows.get(addr)
        if flow is None:
            svc = self.service()
            why = svc.refusal()
            if why is None and not svc.budget.take():
                why = Rejected("resources", f"the activator's file descriptor budget ({svc.budget.limit} "
                                            "connections) is spent; raise LimitNOFILE")
            if why is not None:
                svc.reject(why)
                svc.m.udp_dropped.inc()
                return
            flow = self.flows[addr] = Flow(self, addr, svc)
        flow.datagram(data)

    def error_received(self, exc: Exception) -> None:
        pass  # an ICMP error for a reply we sent (the client went away): nothing to do

    def send(self, data: bytes, addr: Address) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(data, addr)

    def ended(self, flow: Flow) -> None:
        """A relayed flow is over: its conntrack entry goes, so the client's next datagram is a new flow (and can
        take the kernel path). Only for flows the app answered: an unanswered one's entry (a forged source's,
        most likely) times out by itself, and its next datagram is relayed again, which is correct too."""
        if flow.lease is None or len(self._to_forget) >= FORGET_QUEUE:
            return
        self._to_forget[flow.addr] = None
        if self._forgetter is None or self._forgetter.done():
            self._forgetter = spawn(self._forget(), name=f"udp-forget:{self.port}")

    async def _forget(self) -> None:
        if self._forget_pool is None:
            self._forget_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="udp-forget")
        loop = asyncio.get_running_loop()
        while self._to_forget:
            addr = next(iter(self._to_forget))
            del self._to_forget[addr]
            with contextlib.suppress(Exception):  # best effort: at worst the entry times out on its own
                await loop.run_in_executor(self._forget_pool, forget_udp_flow, (str(addr[0]), int(addr[1])),
                                           self.port)

    def close(self) -> None:
        for flow in list(self.flows.values()):
            flow.close()
        if self.transport is not None:
            self.transport.close()
        self._to_forget.clear()
        if self._forgetter is not None:
            self._forgetter.cancel()
        if self._forget_pool is not None:
            self._forget_pool.shutdown(wait=False)
