"""The activation path: accept, hold, get an instance, connect, splice.

Splicing uses asyncio Protocols rather than streams: each side writes straight into the other side's transport,
and flow control is the transports' own (a side whose peer's write buffer is full stops reading until it
drains). That keeps the hot path to one callback per chunk.

Half-close is passed on: EOF from one side becomes write_eof() on the other, and the connection is closed only
once both directions have ended (or either side is lost).

The client's reading is paused from the moment it is accepted until the backend is connected, so nothing is
read before there is somewhere to put it; the kernel's socket buffer holds it meanwhile.

Admission: past the service's max_connections a client is closed as soon as it is accepted; the service may
also turn it away while it waits (queue full, backing off). Both are counted by reason, never silent.
The first connect to an instance retries while the app refuses, until connect_timeout after the instance
became ready; past that the instance is reported broken and removed.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import socket
import time
from typing import Any, cast

from . import proxy_protocol
from .errors import Rejected
from .instance import Instance
from .service import Service
from .tasks import spawn

log = logging.getLogger("activator.proxy")

CONNECT_RETRY_FIRST = 0.005
CONNECT_RETRY_MAX = 0.1


class _End(asyncio.Protocol):
    """One side of a spliced connection."""

    def __init__(self, conn: Connection, counter: Any, *, is_client: bool) -> None:
        self.conn = conn
        self.counter = counter
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.peer: _End | None = None
        self.eof = False
        # uvloop may deliver the first chunk even though reading was paused in connection_made; keep it.
        self.early: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports do not subclass asyncio.Transport; they implement its interface.
        self.transport = cast(asyncio.Transport, transport)
        if self.is_client:
            self.transport.pause_reading()
            self.conn.start()

    def data_received(self, data: bytes) -> None:
        peer = self.peer
        if peer is None or peer.transport is None:
            self.early.append(data)
            return
        peer.transport.write(data)
        self.counter.inc(len(data))

    def flush_early(self) -> None:
        early, self.early = self.early, []
        for data in early:
            self.data_received(data)

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None:  # EOF before the backend exists: pass it on once connected
            return True
        if peer.transport is not None and not peer.transport.is_closing():
            if peer.eof:
                self.conn.close()
                return False
            peer.transport.write_eof()
        return True  # keep our write side open: the other direction may still be talking

    def connection_lost(self, exc: Exception | None) -> None:
        self.conn.close()

    # Flow control: our transport's write buffer is full, so stop reading from the peer that fills it.
    def pause_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None:
            self.peer.transport.pause_reading()

    def resume_writing(self) -> None:
        if self.peer is not None and self.peer.transport is not None and not self.peer.transport.is_closing():
            self.peer.transport.resume_reading()


class Connection:
    """A client connection and, once activated, its backend. Releases its instance exactly once."""

    def __init__(self, service: Service, registry: set[Connection]) -> None:
        self.service = service
        self.registry = registry
        self.client = _End(self, service.m.bytes_in, is_client=True)
        self.backend = _End(self, service.m.bytes_out, is_client=False)
        self.instance: Instance | None = None
        self.closed = False
        self.accepted = time.monotonic()
        self._activation: asyncio.Task[None] | None = None

    def start(self) -> None:
        svc = self.service
        svc.m.connections.inc()
        limit = svc.config.max_connections
        if limit is not None and svc.open_connections >= limit:
            self._reject(Rejected("max-connections", f"service '{svc.name}' has {limit} open connections"))
            return
        self.registry.add(self)
        svc.open_connections += 1
        svc.m.open_connections.inc()
        self._activation = spawn(self._activate(), name=f"activate:{svc.name}")

    def _reject(self, why: Rejected) -> None:
        self.service.reject(why)
        self.closed = True
        if self.client.transport is not None:
            self.client.transport.close()

    async def _activate(self) -> None:
        svc = self.service
        try:
            while True:
                inst, waited = await svc.acquire()
                self.instance = inst
                if self.closed:  # the client left while we waited
                    self._release()
                    return
                deadline = inst.ready_at + svc.config.connect_timeout
                try:
                    sock = await connect_in_instance(inst, svc.config.port, deadline)
                    inst.established += 1
                    break
                except OSError as e:
                    svc.instance_failed(inst, f"app refused connections past connect_timeout: {e.strerror}")
                    self._release()
                    if not inst.established:
                        raise  # a start that never worked: this client is closed, the service backs off
                    # An instance that had worked and died: this client goes to another one.
            # Peers first: the backend may send (a banner) before create_connection returns to us.
            self.client.peer, self.backend.peer = self.backend, self.client
            loop = asyncio.get_running_loop()
            await loop.create_connection(lambda: self.backend, sock=sock)
        except asyncio.CancelledError:
            self.close()
            raise
        except Rejected as e:
            svc.reject(e)
            self.close()
            return
        except Exception as e:
            svc.m.connection_errors.inc()
            log.warning("service=%s connection could not be served: %s", svc.name, e)
            self.close()
            return
        if self.closed:  # the client left during the connect: the backend must not outlive it
            assert self.backend.transport is not None
            self.backend.transport.close()
            return
        if waited:
            svc.m.first_connection_wait.observe(time.monotonic() - self.accepted)
        assert self.client.transport is not None and self.backend.transport is not None
        if svc.config.proxy_protocol is not None:
            self.backend.transport.write(proxy_protocol.header(
                svc.config.proxy_protocol,
                self.client.transport.get_extra_info("peername")[:2],
                self.client.transport.get_extra_info("sockname")[:2],
            ))
        self.client.flush_early()
        if self.client.eof:
            self.backend.transport.write_eof()
        else:
            self.client.transport.resume_reading()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for end in (self.client, self.backend):
            if end.transport is not None:
                end.transport.close()
        if self._activation is not None and not self._activation.done():
            self._activation.cancel()
        self._release()
        self.registry.discard(self)
        self.service.open_connections -= 1
        self.service.m.open_connections.dec()

    def _release(self) -> None:
        if self.instance is not None:
            inst, self.instance = self.instance, None
            self.service.release(inst)

    def abort(self) -> None:
        for end in (self.client, self.backend):
            if end.transport is not None:
                end.transport.abort()
        self.close()


def client_protocol_factory(service: Service, registry: set[Connection]) -> Any:
    """The protocol factory for a service's listening socket: one Connection per accepted client."""
    return lambda: Connection(service, registry).client


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
