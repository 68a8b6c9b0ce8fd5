"""The handoff acceptor (daemon/acceptor.py) closed between two accepts of a burst, on a socket an app made blocking.

close() pokes the thread (a connection to the socket's address) only if `in_accept` is already true; the thread
sets `in_accept` and calls accept() without looking at `_closed` again. Closed after it took one connection and
before it sets `in_accept` for the next (inside `_push`, or its `probe.poll(0)`), it is not poked; if the app then
takes the connection the poll saw, the thread waits in accept() on its own duplicate of the listening socket,
which stays in LISTEN after the service's own descriptor and its apps' are gone: a fresh socket cannot bind the
address (a reload re-adding it, Fleet._bind_again), and the next client is accepted only to be closed."""

from __future__ import annotations

import asyncio
import os
import socket
import threading

import pytest

from activator.daemon.acceptor import Acceptor
from tests.unit.test_acceptor import AppWinsTheSecondAccept


@pytest.mark.asyncio
async def test_a_close_between_two_accepts_of_a_burst_ends_the_thread() -> None:
    loop = asyncio.get_running_loop()
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as sockets.bind_listener makes them
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    address = listener.getsockname()
    app = socket.socket(fileno=os.dup(listener.fileno()))
    acceptor = Acceptor("victim", listener, lambda conn: conn.close(), lambda why: None)
    thief = AppWinsTheSecondAccept(acceptor._sock, app)
    acceptor._sock = thief  # type: ignore[assignment]
    pushed: asyncio.Future[bool] = loop.create_future()
    closed = threading.Event()
    push = acceptor._push

    def push_then_let_the_loop_close(conn: socket.socket) -> bool:
        ok = push(conn)
        in_accept = acceptor.in_accept
        loop.call_soon_threadsafe(lambda: None if pushed.done() else pushed.set_result(in_accept))
        closed.wait(10)  # the loop's close() happens here, before the thread's next in_accept = True
        return ok

    acceptor._push = push_then_let_the_loop_close  # type: ignore[method-assign]
    clients = []
    try:
        for _ in range(2):
            c = socket.socket()
            c.connect(address)
            clients.append(c)
        acceptor.set(True)
        assert await asyncio.wait_for(pushed, 10) is False  # not in accept(): close() will not poke
        acceptor.close()  # the service goes (reload, removal): HandoffListener.stop()
        closed.set()
        await loop.run_in_executor(None, acceptor._thread.join, 5)
        alive = acceptor._thread.is_alive()
        listener.close()  # the service's own descriptor
        app.close()  # ... and its apps are gone
        fresh = socket.socket()
        fresh.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            fresh.bind(address)
            fresh.listen(1)
            rebound = True
        except OSError:
            rebound = False
        finally:
            fresh.close()
        assert not alive, "the closed acceptor's thread waits in accept() for the next client"
        assert rebound, "the address cannot be bound again: the thread's duplicate keeps it in LISTEN"
    finally:
        closed.set()
        if acceptor._thread.is_alive():  # let it go: a connection wakes its accept()
            with socket.socket() as s:
                s.connect(address)
            await loop.run_in_executor(None, acceptor._thread.join, 10)
        for conn in thief.stolen:
            conn.close()
        for c in clients:
            c.close()
        app.close()
        listener.close()
