"""The handoff acceptor's thread (daemon/acceptor.py) on a real, blocking loopback socket, with the race an app
sharing the socket can win played deterministically: between the thread's poll, which saw a connection queued,
and its accept(), the "app" takes that connection. The thread's accept() then waits for the next one; what it had
already taken must reach the loop anyway. CI's full runs lost one client in 500 this way (issue 33's stop): the
thread kept its batch until the burst ended, and the burst ended only when another connection came."""

from __future__ import annotations

import asyncio
import os
import select
import socket
import struct
import threading
from typing import Any

import pytest

from activator.daemon.acceptor import SO_TIMESTAMPING, Acceptor


class AppWinsTheSecondAccept:
    """Stands in for the acceptor's own descriptor: its second accept() lets a competitor (the app) take the
    queued connection first, then accepts for real, on a socket that is blocking."""

    def __init__(self, real: socket.socket, competitor: socket.socket) -> None:
        self._real = real
        self._competitor = competitor
        self.calls = 0
        self.stolen: list[socket.socket] = []
        self.stole = threading.Event()  # set once the app has its connection and the thread goes into accept()

    def accept(self) -> tuple[socket.socket, Any]:
        self.calls += 1
        if self.calls == 2:
            self.stolen.append(self._competitor.accept()[0])
            self.stole.set()
        return self._real.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


@pytest.mark.asyncio
async def test_a_connection_taken_is_delivered_while_the_next_accept_waits() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    assert listener.getblocking()  # as an app that cleared O_NONBLOCK left it
    app = socket.socket(fileno=os.dup(listener.fileno()))  # the app's own holder of the one file
    delivered: asyncio.Queue[socket.socket] = asyncio.Queue()
    problems: list[str] = []
    acceptor = Acceptor("victim", listener, delivered.put_nowait, problems.append)
    thief = AppWinsTheSecondAccept(acceptor._sock, app)
    acceptor._sock = thief  # type: ignore[assignment]
    clients = []
    try:
        for _ in range(2):  # both queued before the thread looks, so its poll after the first sees the second
            c = socket.socket()
            c.connect(listener.getsockname())
            clients.append(c)
        acceptor.set(True)
        first = await asyncio.wait_for(delivered.get(), 10)
        # The first came while the thread was (or was about to be) inside its second accept(), which waits: the
        # app took what the poll saw
        assert await loop.run_in_executor(None, thief.stole.wait, 10)
        assert len(thief.stolen) == 1 and thief.calls == 2 and acceptor.in_accept
        assert first.getpeername() == clients[0].getsockname()
        assert thief.stolen[0].getpeername() == clients[1].getsockname()
        # Positive control: the waiting accept() takes the next connection, which is delivered too
        third = socket.socket()
        third.connect(listener.getsockname())
        clients.append(third)
        nxt = await asyncio.wait_for(delivered.get(), 10)
        assert nxt.getpeername() == third.getsockname()
        for conn in (first, nxt, *thief.stolen):
            conn.close()
    finally:
        acceptor.close()
        await loop.run_in_executor(None, acceptor._thread.join, 10)
        assert not acceptor._thread.is_alive()
        for c in clients:
            c.close()
        app.close()
        listener.close()
    assert problems == []


#: TX timestamps, software, when a write is scheduled and when it is acknowledged, without the data
TX_TIMESTAMPS = (1 << 4) | (1 << 8) | (1 << 9) | (1 << 11)


def tampered_listener() -> socket.socket:
    """A listener as an app that had it could leave it: options every connection accepted from it inherits."""
    sock = socket.create_server(("127.0.0.1", 0))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3600))
    sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING, TX_TIMESTAMPS)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1 << 20)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 1)
    return sock


def linger(sock: socket.socket) -> tuple[int, int]:
    onoff, seconds = struct.unpack("ii", sock.getsockopt(socket.SOL_SOCKET, socket.SO_LINGER, 8))
    return onoff, seconds


def inherited(conn: socket.socket) -> dict[str, object]:
    return {"linger": linger(conn)[0], "timestamping": conn.getsockopt(socket.SOL_SOCKET, SO_TIMESTAMPING),
            "rcvlowat": conn.getsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT),
            "notsent_lowat": conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT)}


def error_after_a_write(conn: socket.socket, client: socket.socket, wait_ms: int) -> bool:
    """Write, let the client take it (acknowledged), then: is the connection in error for poll (its error queue
    not empty: what makes an event loop that never reads it spin)?"""
    conn.sendall(b"x" * 1000)
    client.recv(1000)
    probe = select.poll()
    probe.register(conn.fileno(), select.POLLIN)
    return any(ev & select.POLLERR for _, ev in probe.poll(wait_ms))


def test_the_kernel_gives_a_connection_what_the_listener_was_set_to() -> None:
    # The positive control for the next test: what anyone who accepts from such a socket gets
    with tampered_listener() as listener, socket.create_connection(listener.getsockname()) as client:
        conn, _ = listener.accept()
        with conn:
            assert inherited(conn) == {"linger": 1, "timestamping": TX_TIMESTAMPS, "rcvlowat": 1 << 20,
                                       "notsent_lowat": 1}
            assert error_after_a_write(conn, client, 2000)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 0, 0))


@pytest.mark.asyncio
async def test_a_connection_gets_none_of_what_an_app_set_on_the_socket() -> None:
    # An app sets options on the socket it shares with the activator, and the activator's connections would inherit
    # them: SO_LINGER holds the event loop (every service) in close() for the linger time; TX timestamps keep
    # it spinning on an error queue it never reads.
    loop = asyncio.get_running_loop()
    listener = tampered_listener()
    delivered: asyncio.Queue[socket.socket] = asyncio.Queue()
    problems: list[str] = []
    acceptor = Acceptor("victim", listener, delivered.put_nowait, problems.append)
    client = socket.create_connection(listener.getsockname())
    try:
        acceptor.set(True)
        conn = await asyncio.wait_for(delivered.get(), 10)
        with conn:
            assert inherited(conn) == {"linger": 0, "timestamping": 0, "rcvlowat": 1, "notsent_lowat": 0}
            conn.setblocking(True)
            assert not await loop.run_in_executor(None, error_after_a_write, conn, client, 200)
    finally:
        acceptor.close()
        await loop.run_in_executor(None, acceptor._thread.join, 10)
        client.close()
        listener.close()
    assert problems == []
