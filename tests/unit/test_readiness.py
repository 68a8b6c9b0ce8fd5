"""Readiness from /proc, on this process's own loopback sockets (no engine needed)."""

from __future__ import annotations

import os
import socket

from activator.runtime import readiness


def test_listening_port_is_seen_without_connecting() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not readiness.is_listening(os.getpid(), port)
        s.listen()
        assert readiness.is_listening(os.getpid(), port)


def test_stray_connection_is_found_until_its_descriptor_closes() -> None:
    me = os.getpid()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        before = readiness.held_sockets(me)
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        assert readiness.stray_connections(me, before)
        client.close()
        accepted.close()
        assert not readiness.stray_connections(me, before)
