"""Readiness from /proc, on this process's own loopback sockets (no engine needed)."""

from __future__ import annotations

import contextlib
import os
import socket

import pytest

from activator.runtime import readiness


def test_listening_port_is_seen_without_connecting() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        assert not readiness.is_listening(os.getpid(), port)
        s.listen()
        assert readiness.is_listening(os.getpid(), port)


def own_sockets() -> set[int]:
    """The socket inodes of this process's descriptors."""
    found = set()
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own descriptor, closed by now
            target = os.readlink(f"/proc/self/fd/{fd}")
            if target.startswith("socket:["):
                found.add(int(target[8:-1]))
    return found


def inode(sock: socket.socket) -> int:
    return int(os.readlink(f"/proc/self/fd/{sock.fileno()}")[8:-1])


def test_stray_connection_is_found_until_its_descriptor_closes() -> None:
    """Of what stray_connections finds, this process's own: it looks at the whole pid namespace, here the host's,
    where any other process may open a socket meanwhile."""
    me = os.getpid()
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        before = readiness.held_sockets(me)
        client = socket.create_connection(server.getsockname())
        accepted, _ = server.accept()
        assert readiness.stray_connections(me, before) & own_sockets() == {inode(client), inode(accepted)}
        client.close()
        accepted.close()
        assert not readiness.stray_connections(me, before) & own_sockets()


def test_what_a_readiness_command_leaves_is_told_from_the_apps_own_processes(monkeypatch: pytest.MonkeyPatch
                                                                              ) -> None:
    """readiness.foreign: PostgreSQL's workers (session leaders, children of the app) are the app's; a process a
    `runc exec` left (reparented to the app, in the exec's session) and its children are not."""
    from activator.runtime import readiness

    # pid: (parent, session); 1 is the app, in session 1
    table = {1: (0, 1), 10: (1, 10), 11: (1, 1), 12: (11, 1),  # a worker leading its session; a child; grandchild
             20: (1, 7), 21: (20, 7), 22: (20, 22)}  # left by the command (session 7), its children
    monkeypatch.setattr(readiness, "processes", lambda init: set(table))
    monkeypatch.setattr(readiness, "_stat", lambda pid: table.get(pid))
    assert readiness.foreign(1) == {20, 21, 22}
