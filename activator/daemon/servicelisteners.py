"""A service's listening sockets as Listeners (listening.py): a TCP socket accepted on by an asyncio server, a
handoff service's socket accepted on by a thread of its own (acceptor.py) while its apps do not, and a UDP socket
with the UdpFront that serves its flows. Fleet keeps them per service (Fleet.listening).

Their stop() never waits on anything: a reload swaps listeners between two steps nothing else may run between.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import socket
from collections.abc import Callable

from activator.tasks import Tasks

from .acceptor import Acceptor
from .service import Service
from .sockets import BACKLOG, address_of
from .udp import UdpFront, Unanswered

log = logging.getLogger("activator")

ProtocolFactory = Callable[[], asyncio.Protocol]


class TcpListener:
    def __init__(self, service: str, sock: socket.socket, factory: ProtocolFactory) -> None:
        self._sock = sock
        self.name = f"{service} TCP listener {address_of(sock)}"
        self._factory = factory
        self._server: asyncio.Server | None = None

    @property
    def sock(self) -> socket.socket:
        return self._sock

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._factory, sock=self._sock, backlog=BACKLOG)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        self._sock.close()  # closing the server detached it already (uvloop): this is for a socket never served


class HandoffListener:
    """A socket shared with the service's apps (handoff.py): the activator accepts on it only while `on`."""

    def __init__(self, service: str, sock: socket.socket, factory: ProtocolFactory, tasks: Tasks, *,
                 on: bool) -> None:
        self._sock = sock
        self.service = service
        self.address = address_of(sock)
        self.name = f"{service} handoff listener {self.address}"
        self._factory = factory
        self._tasks = tasks
        self.on = on
        self.acceptor: Acceptor | None = None
        self._app_flags: int | None = None  # the file's flags as its apps had them, while the activator accepts

    @property
    def sock(self) -> socket.socket:
        return self._sock

    async def start(self) -> None:
        loop = asyncio.get_running_loop()

        def deliver(conn: socket.socket) -> None:
            self._tasks.spawn(self._connected(loop, conn), name="accepted")

        def problem(why: str) -> None:
            log.warning("service=%s its socket %s: %s%s", self.service, self.address, why,
                        "; put back within a second" if why == "no longer listens" else "")

        self.acceptor = Acceptor(self.service, self._sock, deliver, problem)
        if self.on:
            self._resume(self.acceptor)

    def _resume(self, acceptor: Acceptor) -> None:
        # The file's flags are the apps' too: CRIU gave a restored app its own (usually blocking). Non-blocking
        # while the activator accepts only spares its thread a wait (acceptor.py); the apps get theirs back.
        fd = self._sock.fileno()
        self._app_flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        self._sock.setblocking(False)
        acceptor.set(True)

    def accepting(self, on: bool) -> None:
        """Accept on the socket or not (Fleet.accepting says why it is a thread, not a server or a reader)."""
        if on == self.on:
            return
        self.on = on
        if self.acceptor is None:  # not started: start() takes `on` as it is then
            return
        if on:
            self._resume(self.acceptor)
            return
        self.acceptor.set(False)
        if (flags := self._app_flags) is not None:
            self._app_flags = None
            fcntl.fcntl(self._sock.fileno(), fcntl.F_SETFL, flags)  # the apps' own (handoff.py)

    def kick(self) -> None:
        """The socket listens again after an app shut it down (Fleet.listening_again)."""
        if self.acceptor is not None:
            self.acceptor.kick()

    def stop_accepting(self) -> None:
        """For good, leaving the socket open (Fleet.replace_socket still takes it out of LISTEN)."""
        self._app_flags = None
        if self.acceptor is not None:
            self.acceptor.close()

    async def stop(self) -> None:
        self.stop_accepting()
        self._sock.close()

    async def _connected(self, loop: asyncio.AbstractEventLoop, conn: socket.socket) -> None:
        try:
            await loop.connect_accepted_socket(self._factory, conn)
        except OSError:
            conn.close()


class UdpListener:
    def __init__(self, service: str, sock: socket.socket, current: Callable[[], Service],
                 unanswered: Unanswered) -> None:
        self._sock = sock
        self.name = f"{service} UDP listener {address_of(sock)}"
        self.front = UdpFront(current, sock.getsockname()[1], unanswered)

    @property
    def sock(self) -> socket.socket:
        return self._sock

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.create_datagram_endpoint(lambda: self.front, sock=self._sock)

    async def stop(self) -> None:
        self.front.close()  # its flows end (their leases released) and its transport closes the socket
        self._sock.close()
