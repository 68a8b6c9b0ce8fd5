"""The handoff socket's guards on real (loopback) sockets, in this process: what an app could do to its service's
listening socket (a socket filter, locked or not; a tiny listen backlog) is seen, and an untouched socket is not
(the positive control). The engine tests play the same against the daemon from inside an instance
(tests/engine/test_handoff_attacks.py)."""

from __future__ import annotations

import ctypes
import socket
from collections.abc import Iterator

import pytest

from activator.daemon.handoff import SO_LOCK_FILTER, listen_backlog, socket_filter

SO_ATTACH_FILTER = 26


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def attach_drop_all(sock: socket.socket, instructions: int = 1) -> None:
    """A classic BPF program of `instructions` that drops every packet (what tests/images/attacker.c attaches)."""
    prog = (SockFilter * instructions)()
    for i in range(instructions):
        prog[i] = SockFilter(0x06, 0, 0, 0)  # BPF_RET | BPF_K, 0: drop
    fprog = SockFprog(instructions, prog)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setsockopt(sock.fileno(), socket.SOL_SOCKET, SO_ATTACH_FILTER, ctypes.byref(fprog),
                       ctypes.sizeof(fprog)):
        raise OSError(ctypes.get_errno(), "SO_ATTACH_FILTER")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    yield sock
    sock.close()


def test_an_untouched_socket_has_no_filter_and_its_backlog(listener: socket.socket) -> None:
    assert socket_filter(listener) is None
    assert listen_backlog(listener) == 1024


@pytest.mark.parametrize("instructions", [1, 4096])  # 4096: the most the kernel allows, far past 1024 bytes
def test_an_attached_filter_is_seen(listener: socket.socket, instructions: int) -> None:
    attach_drop_all(listener, instructions)
    assert socket_filter(listener) == "attached"


def test_a_locked_filter_is_seen(listener: socket.socket) -> None:
    attach_drop_all(listener)
    listener.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
    with pytest.raises(OSError):  # what makes it worse than a filter: nobody can take it off
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_DETACH_FILTER if hasattr(socket, "SO_DETACH_FILTER")
                            else 27, 0)
    assert socket_filter(listener) == "attached and locked"


def test_a_lock_without_a_filter_is_harmless_and_not_reported(listener: socket.socket) -> None:
    listener.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
    assert socket_filter(listener) is None


def test_a_tiny_backlog_and_a_shut_socket_are_told_apart(listener: socket.socket) -> None:
    listener.listen(1)
    assert listen_backlog(listener) == 1
    listener.shutdown(socket.SHUT_RDWR)
    assert listen_backlog(listener) is None
