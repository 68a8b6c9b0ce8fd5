"""A TCP client connection through the activator: accept, hold, wake, connect, splice.

A client connection goes through three phases, and bytes cross to the app only in the last:

  held     Accepted and admitted (service.admit: max_connections, the descriptor budget). Nothing is forwarded.
           If the service needs waking (no instance could take the connection now) and `wake_on: data`, the
           client must first show it is real: its first byte wakes the service, or `wake_grace` of silence does
           (server-speaks-first protocols: MySQL, SMTP). A client that closes or resets before either (a port
           scan) wakes nothing and is counted as ignored. Otherwise the connection wakes at once.
  waking   The lease acquires an instance (waiting for a restore if need be) and the app is dialled inside the
           instance's network namespace, retrying while it does not accept yet. How that ends when it fails
           (refused, counted, logged; `resources` when the activator itself runs short) is activation.py's,
           the same for a UDP flow.
  spliced  In one synchronous step, with no await in between: the PROXY header (if configured), then every held
           client byte in order, then a held EOF, are written to the backend; only then does the client side
           pass bytes straight through. So the header is always the first thing the app reads, and nothing a
           client sends early can overtake it or the bytes before it.

While not spliced, the client side keeps whatever arrives and pauses reading (uvloop starts reading after
connection_made even when it was paused there, so the first chunk can come anyway; it is kept, not lost).
Reading stays enabled while held for waking, so a close or a reset is noticed.

Splicing uses asyncio Protocols rather than streams: each side writes straight into the other side's transport,
and flow control is the transports' own (a side whose peer's write buffer is full stops reading until it
drains). Half-close is passed on: EOF from one side becomes write_eof() on the other, and the connection is
closed once both directions have ended (or either side is lost).

Optional `client_idle_timeout`: no byte either way for that long closes the connection (counted). And
`client_silent_timeout` (60 s by default): a client that has not sent a single byte that long after it was
accepted is closed (counted the same way), so connections that never speak (a scan, a flood, a stuck client)
cannot pin instances forever, while quiet sessions that have exchanged data keep theirs.
"""

from __future__ import annotations

import asyncio
import errno
import ipaddress
import logging
import math
import socket
import time
from collections.abc import Callable
from typing import Any, cast

from activator.checkpoints.instance import Instance
from activator.core import httpwait, probes, proxy_protocol
from activator.core.phases import Action, Arm, ArmSilent, Close, ConnectionPhases, KeepReading, Timeouts, Wake, Why
from activator.errors import Rejected
from activator.tasks import spawn

from . import activation, probeanswers
from .lease import Lease
from .service import Service

log = logging.getLogger("activator.proxy")

CONNECT_RETRY_FIRST = 0.005
CONNECT_RETRY_MAX = 0.1
HANDED_GRACE = 0.6  # handoff: a refused socket is put back within a meter tick (watchers.METER_INTERVAL)
#: what the waiting page's Retry-After and its reload say, seconds
WAITING_PAGE_RETRY = 1


class ConnectionSet:
    """Every open client connection of the daemon; shutdown waits on it draining instead of polling."""

    def __init__(self) -> None:
        self._conns: set[Connection] = set()
        self._empty = asyncio.Event()
        self._empty.set()

    def add(self, conn: Connection) -> None:
        self._conns.add(conn)
        self._empty.clear()

    def discard(self, conn: Connection) -> None:
        self._conns.discard(conn)
        if not self._conns:
            self._empty.set()

    def __len__(self) -> int:
        return len(self._conns)

    def __iter__(self) -> Any:
        return iter(list(self._conns))

    async def wait_empty(self) -> None:
        await self._empty.wait()


class _End(asyncio.Protocol):
    """One side of a connection. Its bytes go straight to the peer once `through`; until then they are held."""

    def __init__(self, conn: Connection, counter: Any) -> None:
        self.conn = conn
        self.counter = counter
        self.transport: asyncio.Transport | None = None
        self.peer: _End | None = None
        self.through = False
        self.held = bytearray()
        self.eof = False  # this side sent EOF
        self.eof_passed = False  # ... and the peer has been told (write_eof)
        self.blocked = False  # the peer's write buffer is full: do not read

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement its interface.
        self.transport = cast(asyncio.Transport, transport)
        self.conn.made(self)

    def data_received(self, data: bytes) -> None:
        conn = self.conn
        if self.through:
            assert self.peer is not None and self.peer.transport is not None
            self.peer.transport.write(data)
            self.counter.inc(len(data))
            # The splice's hot path: the phase machine hears of bytes only while a timer watches for them.
            if conn.watching or (self is conn.client and conn.silent_timer is not None):
                conn.activity(self)
            return
        self.held += data
        assert self.transport is not None
        self.transport.pause_reading()
        conn.activity(self)

    def eof_received(self) -> bool:
        self.eof = True
        if self.through:
            return self._pass_eof()
        return self.conn.client_gone()

    def _pass_eof(self) -> bool:
        """Tell the peer this direction is done; close when both are. False: the transport may close."""
        peer = self.peer
        assert peer is not None and peer.transport is not None
        self.eof_passed = True
        if peer.eof_passed:
            self.conn.close()
            return False
        if not peer.transport.is_closing():
            peer.transport.write_eof()
        return True  # keep our write side open: the other direction may still be talking

    def open(self) -> None:
        """Let bytes through: what was held first, in order, then a held EOF."""
        assert self.peer is not None and self.peer.transport is not None
        self.through = True
        if self.held:
            self.peer.transport.write(bytes(self.held))
            self.counter.inc(len(self.held))
            self.held.clear()
        if self.eof and not self._pass_eof():
            return
        self._update_reading()

    def _update_reading(self) -> None:
        t = self.transport
        if t is None or t.is_closing() or self.eof:
            return
        if self.through and not self.blocked:
            t.resume_reading()
        else:
            t.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        if self is self.conn.client and not self.through and not self.conn.closed:
            self.conn.client_gone()  # a reset (or a close we had not read yet) before the splice
        self.conn.close()

    # Flow control: our transport's write buffer is full, so stop reading from the peer that fills it.
    def pause_writing(self) -> None:
        if self.peer is not None:
            self.peer.blocked = True
            self.peer._update_reading()

    def resume_writing(self) -> None:
        if self.peer is not None:
            self.peer.blocked = False
            self.peer._update_reading()


class Connection:
    """A client connection and, once spliced, its backend. Releases what it holds exactly once. Its phase and
    timers are decided by core/phases.py (events in, actions out); this does the I/O they call for."""

    def __init__(self, service: Service, registry: ConnectionSet) -> None:
        self.service = service
        self.registry = registry
        self.client = _End(self, service.m.bytes_in)
        self.backend = _End(self, service.m.bytes_out)
        self.client.peer, self.backend.peer = self.backend, self.client
        self.backend.through = True  # the app may speak first (a banner); the client's transport exists
        self.lease: Lease | None = None
        self.closed = False
        self.accepted = time.monotonic()
        cfg = service.config
        self.phases = ConnectionPhases(Timeouts(wake_on_connect=cfg.wake_on == "connect", wake_grace=cfg.wake_grace,
                                                idle=cfg.client_idle_timeout, silent=cfg.client_silent_timeout),
                                       self.accepted)
        self.watching = cfg.client_idle_timeout is not None  # every byte counts as activity
        self._timer: asyncio.TimerHandle | None = None
        self.silent_timer: asyncio.TimerHandle | None = None  # until the client's first byte
        self._activation: asyncio.Task[None] | None = None
        self._page_timer: asyncio.TimerHandle | None = None  # waiting_page
        self.source: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None  # the client's, once probes ask
        self.prober = False  # it comes from a probe's `from` network
        self.tcp_probe = False  # ... of a tcp: true probe

    @property
    def phase(self) -> str:
        return self.phases.phase.value

    def _do(self, actions: list[Action]) -> None:
        """Carry out what the phase machine decided, in order."""
        for a in actions:
            if isinstance(a, Wake):
                self.wake()
            elif isinstance(a, KeepReading):
                assert self.client.transport is not None
                self.client.transport.resume_reading()
            elif isinstance(a, Arm):
                self._arm(a.delay)
            elif isinstance(a, ArmSilent):
                if self.silent_timer is not None:
                    self.silent_timer.cancel()
                    self.silent_timer = None
                if a.delay is not None:
                    self.silent_timer = asyncio.get_running_loop().call_later(a.delay, self._silent)
            elif isinstance(a, Close):
                self._closed_by_us(a.why)

    # --- held ---------------------------------------------------------------------------------------------

    def made(self, end: _End) -> None:
        if end is self.backend:
            return
        svc = self.service
        svc.m.connections.inc()
        try:
            self.lease = svc.admit()
        except Rejected as e:
            svc.reject(e)
            self.turned_away(e)
            return
        self.registry.add(self)
        if svc.config.probes and (source := self._prober()) is not None:
            # A prober's connection waits for its request even when an instance runs (it may be a probe, which is
            # answered here and must not reach an instance or keep one alive); a TCP check's silence wakes nothing.
            tcp = probes.tcp_prober(svc.config.probes, source)
            self.tcp_probe = tcp
            cfg = svc.config
            self.phases = ConnectionPhases(Timeouts(wake_on_connect=False, wake_grace=None if tcp else cfg.wake_grace,
                                                    idle=cfg.client_idle_timeout, silent=cfg.client_silent_timeout),
                                           self.accepted)
            self._do(self.phases.admitted(self.accepted, needs_wake=True))
            return
        self._do(self.phases.admitted(self.accepted, needs_wake=svc.needs_wake()))

    def _prober(self) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
        """The client's address if it is one of the service's probers (a probe's `from`), else None."""
        assert self.client.transport is not None
        peer = self.client.transport.get_extra_info("peername")
        try:
            source = ipaddress.ip_address(peer[0].split("%", 1)[0])
        except (TypeError, ValueError, IndexError):  # not an IP socket (tests pass Unix ones): not a prober
            return None
        if not probes.any_prober(self.service.config.probes, source):
            return None
        self.source, self.prober = source, True
        return source

    def activity(self, end: _End) -> None:
        now = time.monotonic()
        self._do(self.phases.client_data(now) if end is self.client else self.phases.backend_data(now))

    def client_gone(self) -> bool:
        """The client sent EOF (or vanished) while not spliced. Returns what eof_received should: keep the
        transport half-open when the EOF is to be passed on later (False: it was closed, as ignored)."""
        self._do(self.phases.client_gone(holding_bytes=bool(self.client.held)))
        return not self.closed

    def wake(self) -> None:
        assert self.client.transport is not None
        self.client.transport.pause_reading()
        if self.prober and self._answer_probe():
            return
        self._activation = spawn(self._activate(), name=f"activate:{self.service.name}")
        after = self.service.config.waiting_page
        if after is not None:
            self._page_timer = asyncio.get_running_loop().call_later(after, self._waiting_page)

    # --- probes ---------------------------------------------------------------------------------------------

    def _answer_probe(self) -> bool:
        """The held request is a probe the activator answers (probeanswers.py), never spliced. False: served as
        any connection."""
        asked = None if self.source is None else \
            probeanswers.answerable(self.service, self.source, bytes(self.client.held))
        if asked is None:
            return False
        self._activation = spawn(self._probe(*asked), name=f"probe:{self.service.name}")
        return True

    async def _probe(self, target: str, head_only: bool) -> None:
        answer = await probeanswers.answer(self.service, target, head_only=head_only)
        if not self.closed and self.client.transport is not None:
            self.client.transport.write(answer)
        self.close()

    def _waiting_page(self) -> None:
        """A browser still waiting for its instance gets the 'starting' page (httpwait.py) and reloads; the start
        goes on without it. Anyone else keeps waiting."""
        self._page_timer = None
        if self.closed or self.client.through or self.client.transport is None:
            return
        if not httpwait.is_page_load(bytes(self.client.held)):
            return
        self.service.m.waiting_pages.inc()
        self.client.transport.write(httpwait.waiting_page(self.service.name, WAITING_PAGE_RETRY))
        self.close()

    def _arm(self, delay: float | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if delay is not None:
            self._timer = asyncio.get_running_loop().call_later(delay, self._timer_fired)

    def _timer_fired(self) -> None:
        self._timer = None
        self._do(self.phases.timer(time.monotonic()))

    def _silent(self) -> None:
        self.silent_timer = None
        self._do(self.phases.silent())

    def _closed_by_us(self, why: Why) -> None:
        svc = self.service
        if why is Why.IGNORED and self.tcp_probe:
            svc.m.probes["tcp/accepted"].inc()
        elif why is Why.IGNORED:
            svc.m.ignored.inc()
        else:
            svc.m.idle_closes.inc()
            log.debug("service=%s connection closed: %s", svc.name,
                      f"the client sent nothing in {svc.config.client_silent_timeout:g}s" if why is Why.SILENT else
                      f"no byte either way in {svc.config.client_idle_timeout:g}s")
        self.close()

    # --- waking -------------------------------------------------------------------------------------------

    async def _activate(self) -> None:
        if await activation.activate(self.service, self, self._reach, what="connection", since=self.accepted,
                                     log=log) is not None:
            self._splice()

    async def _reach(self) -> tuple[asyncio.BaseTransport, bool]:
        """The backend: an instance from the lease, and the app dialled in it. Raises Rejected."""
        svc, lease = self.service, self.lease
        assert lease is not None
        while True:
            inst, waited = await lease.acquire()
            deadline = inst.ready_at + svc.config.connect_timeout
            try:
                sock = inst.claim_connection() or await self._dial(inst, deadline)
                break
            except OSError as e:
                if (short := activation.short_of(e, f"service '{svc.name}': no backend socket")) is not None:
                    lease.drop()
                    raise short from None
                if lease.broken(f"app refused connections past connect_timeout: {e.strerror}"):
                    continue  # an instance that had worked and died: this client goes to another one
                raise  # a start that never worked: this client is closed, the service backs off
        lease.connected()
        try:
            backend, _ = await asyncio.get_running_loop().create_connection(lambda: self.backend, sock=sock)
        except OSError as e:
            sock.close()
            if (short := activation.short_of(e, f"service '{svc.name}'")) is not None:
                raise short from None
            raise
        return backend, waited

    async def _dial(self, inst: Instance, deadline: float) -> socket.socket:
        """The app, where the service's mode reaches it. A handoff app may shut the service's socket down (as it
        resumes, or at any time): within a meter tick the socket listens again, or the app is seen to have left it
        and is dialled on its own address; until then (HANDED_GRACE at least), a refusal is tried again."""
        svc, until = self.service, max(deadline, time.monotonic() + HANDED_GRACE)
        while (where := svc.reached_at(inst)) is not None:
            try:  # bounded: a full accept queue would hold this client for the kernel's SYN retries (minutes)
                sock = await asyncio.wait_for(connect_handed(where), max(0.05, until - time.monotonic()))
            except ConnectionRefusedError:
                if time.monotonic() >= until:
                    raise
                await asyncio.sleep(CONNECT_RETRY_MAX)
                continue
            svc.arrived += 1  # one more connection on the service's socket that is the activator's (handoff.py)
            return sock
        return await connect_in_instance(inst, svc.config.port, deadline)

    def turned_away(self, why: Rejected | None) -> None:
        """Refused (why) or failed (None): a refused client is told so, as the service's `refusal` says."""
        if why is not None and self.client.transport is not None and not self.closed:
            _refuse(self.client.transport, self.service.config.refusal, why)
        self.close()

    # --- spliced ------------------------------------------------------------------------------------------

    def _splice(self) -> None:
        """Header, held bytes, held EOF, then straight through: one synchronous step, nothing can interleave."""
        client, backend = self.client.transport, self.backend.transport
        assert client is not None and backend is not None
        if self._page_timer is not None:
            self._page_timer.cancel()
            self._page_timer = None
        version = self.service.config.proxy_protocol
        if version is not None:
            backend.write(proxy_protocol.header(version, client.get_extra_info("peername")[:2],
                                                client.get_extra_info("sockname")[:2]))
        self.client.open()
        if not self.closed:
            self._do(self.phases.spliced(time.monotonic()))

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.phases.closed()
        self._arm(None)
        if self._page_timer is not None:
            self._page_timer.cancel()
            self._page_timer = None
        if self.silent_timer is not None:
            self.silent_timer.cancel()
            self.silent_timer = None
        for end in (self.client, self.backend):
            if end.transport is not None:
                end.transport.close()
        if self._activation is not None and not self._activation.done():
            self._activation.cancel()
        if self.lease is not None:
            self.lease.release()
        self.registry.discard(self)

    def abort(self) -> None:
        for end in (self.client, self.backend):
            if end.transport is not None:
                end.transport.abort()
        self.close()


def client_protocol_factory(service: Callable[[], Service], registry: ConnectionSet) -> Callable[[], asyncio.Protocol]:
    """The protocol factory for a service's listening socket: one Connection per accepted client, for the
    service as defined at the time (a reload may replace it)."""
    return lambda: Connection(service(), registry).client


async def connect_in_instance(inst: Instance, port: int, deadline: float) -> socket.socket:
    """Dial the app on 127.0.0.1 inside the instance's namespace, retrying while it does not accept yet."""
    loop = asyncio.get_running_loop()
    pause = CONNECT_RETRY_FIRST
    while True:
        sock = inst.sandbox.netns.socket()
        try:
            await loop.sock_connect(sock, ("127.0.0.1", port))
            return sock
        except OSError as e:
            sock.close()
            if e.errno not in (errno.ECONNREFUSED, errno.ECONNRESET) or time.monotonic() >= deadline:
                raise
        except BaseException:
            sock.close()
            raise
        await asyncio.sleep(pause)
        pause = min(pause * 2, CONNECT_RETRY_MAX)


async def connect_handed(address: tuple[str, int]) -> socket.socket:
    """A connection to the service's own socket, which the apps accept from (handoff): the activator does not
    accept on it meanwhile, so an app takes it. The handshake is the kernel's (the listener's), at once."""
    sock = socket.socket(socket.AF_INET6 if ":" in address[0] else socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, address)
    except BaseException:
        sock.close()
        raise
    return sock


def _refuse(transport: asyncio.BaseTransport, how: str, why: Rejected) -> None:
    """A refused client is told so: closed (every protocol understands that), or for an HTTP service an answer
    503 with Retry-After. The reason is the metric label only: the log's details (paths, an app's errors) are not
    a client's business."""
    if how == "http-503":  # (uvloop's transports are not asyncio.WriteTransport subclasses: no isinstance)
        body = f"service unavailable ({why.reason}); try again later\n".encode()
        head = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Retry-After: %d\r\nContent-Length: %d\r\n\r\n" % (max(1, math.ceil(why.retry_after)), len(body)))
        cast(asyncio.WriteTransport, transport).write(head + body)
    transport.close()
