"""A service's handoff path (`handoff: true`): its instances accept from the service's own listening socket.

CRIU (with scripts/criu-patches/0002) puts the socket the activator listens on into each restored app in place of
the one the app listened on at dump time. A connection then goes from the client to the app as if the app itself
were listening on the host: no DNAT, veth or bridge, no byte through the activator. The kernel spreads accepts
over the instances blocked in accept() or epoll on that socket.

While one such instance runs or is being restored, the activator does not accept on the socket at all
(Fleet.accepting): a connection the activator took would have to be handed to an app through the same socket,
where the activator could take it again. And the socket's file flags are shared with the apps: CRIU gives a restored
app its own (blocking, for most), and an accept() of the activator's that an app won the race for would then block
the event loop for good (seen: busybox httpd). So the activator accepts only while no app can run: none runs (the
last one reaped, or frozen to be counted before its reap) and none is being restored; it makes the socket
non-blocking when it starts and gives the apps their flags back when it stops. Connections it held when the restore
began are passed on by connecting to the socket's own address (proxy.connect_handed); those that come during the
restore wait in the accept queue for the app.

Everything else an app can do to the socket, it does for every holder (the socket and its open file are one):
- its status flags (O_NONBLOCK cleared, even while it hides its descriptor in an SCM_RIGHTS message so that the
  activator believes it closed the socket): the activator's accept() is in a thread of its own (acceptor.py),
  where a wait holds up that one service, never the event loop;
- shutdown(2): listening again, each meter tick (keep_listening);
- listen() with a tiny backlog: its own backlog given back, each tick (keep_backlog);
- a socket filter (SO_ATTACH_FILTER or SO_ATTACH_BPF; one that drops everything makes the socket deaf for every
  holder and stays after the app is gone, and SO_LOCK_FILTER keeps anyone from detaching it): seen each tick
  (socket_filter), every instance of the service is killed and the socket replaced by a fresh one on the same
  address (Fleet.replace_socket).

Counting: the apps' connections live in the host's socket table (sockdiag.py); an instance's are those whose
inode is in its processes' descriptor tables. An instance to be reaped is frozen first (it can take no new
connection from the socket, and its table cannot change), counted, and killed frozen with none open, or thawed
and kept; a connection waiting in the accept queue meanwhile stays there for the next taker.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable
from dataclasses import dataclass

from activator.checkpoints.instance import Instance
from activator.config.service import ServiceConfig
from activator.net import sockdiag

from .listeners import BACKLOG

log = logging.getLogger("activator")

SO_GET_FILTER = 26  # asm-generic/socket.h (= SO_ATTACH_FILTER); Python's socket module names neither
SO_LOCK_FILTER = 44
TCP_LISTEN = 10
_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_uint32)]


def socket_filter(sock: socket.socket) -> str | None:
    """What socket filter the socket has: None, "attached" or "attached and locked".

    Asked with a zero length, the kernel answers the filter's length in instructions and copies nothing (with any
    other length it copies 8 bytes per instruction into a buffer sized in bytes: Python's getsockopt() must not be
    used). A filter loaded as eBPF has no classic program to report: EACCES, attached just the same."""
    size = ctypes.c_uint32(0)
    if _libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, SO_GET_FILTER, None, ctypes.byref(size)) == 0:
        attached = size.value > 0
    else:
        err = ctypes.get_errno()
        if err != errno.EACCES:
            raise OSError(err, os.strerror(err))
        attached = True
    if not attached:
        return None
    return "attached and locked" if sock.getsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER) else "attached"


def listen_backlog(sock: socket.socket) -> int | None:
    """A listening socket's backlog (TCP_INFO reports it as tcpi_sacked for a listener), None if not listening."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    if info[0] != TCP_LISTEN:
        return None
    return int(struct.unpack_from("I", info, 28)[0])


@dataclass(frozen=True)
class HandoffSample:
    counts: dict[str, int]  # open connections of each handed instance, by name
    backlog: int  # connections in the accept queue that no app has taken yet
    dropped: tuple[str, ...]  # instances whose app no longer holds the socket (it closed it)


class HandoffSteering:
    """Which of a service's instances take connections from its socket, and how many each holds."""

    half_open_timeout = 0.0  # handshakes complete in the listener, never in an instance

    def __init__(self, config: ServiceConfig, listener: socket.socket, accepting: Callable[[bool], None]) -> None:
        self.config = config
        self.listener = listener
        self.inode = os.fstat(listener.fileno()).st_ino
        self.family = listener.family
        host, port = listener.getsockname()[:2]
        self.host, self.port = str(host), int(port)
        # where the activator passes on a connection it holds: the socket's own address (loopback for a wildcard)
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1"}
        self.address: tuple[str, int] | None = (wildcard.get(host, host), self.port)
        self._accepting = accepting
        self.backlog = listen_backlog(listener) or BACKLOG  # as it was bound (systemd's Backlog=, or ours)
        self.replacing = False  # Fleet.replace_socket is under way

    def set(self, instances: list[Instance], starting: int = 0) -> None:
        """The activator accepts only while no app can: none runs, and none is being restored (a restored app
        accepts from the moment CRIU resumes it, before the restore returns)."""
        self._accepting(not starting and not any(i.handoff for i in instances))

    def open_count(self, inst: Instance) -> tuple[int, int]:
        """Blocking: (connections its processes hold, 0). On an error, one: never reaped on a count not made."""
        try:
            table = sockdiag.read(self.family, self.port)
            return (len(table.accepted & inst.sandbox.socket_inodes()), 0)
        except Exception as e:
            log.warning("instance=%s: counting its connections failed (%s); kept for now", inst.name, e)
            return (1, 0)

    def keep_listening(self) -> bool:
        """An app may shutdown() the socket it was handed, which is the activator's socket too: listening again on
        the bound socket is all it takes to serve again. True if it had to (one getsockopt otherwise)."""
        if self.listener.fileno() < 0 or self.listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        # A socket bound to port 0 (as a test binds) lost its port in the shutdown, though getsockname() still
        # names it: bound again, or listen() would pick a new one. One bound to its port keeps it (EINVAL).
        with contextlib.suppress(OSError):
            self.listener.bind((self.host, self.port))
        self.listener.listen(self.backlog)
        return True

    def keep_backlog(self) -> int | None:
        """An app may listen() on the socket again with a backlog of 1 (connections then dropped under any load,
        after the app is gone too): the socket's own given back. The backlog it found if it had to, else None."""
        if self.listener.fileno() < 0 or (found := listen_backlog(self.listener)) is None or found >= self.backlog:
            return None
        self.listener.listen(self.backlog)
        return found

    def sample(self, instances: list[Instance]) -> HandoffSample:
        """Blocking: each handed instance's open connections, the accept queue, and who closed the socket."""
        table = sockdiag.read(self.family, self.port)
        counts: dict[str, int] = {}
        dropped: list[str] = []
        for inst in instances:
            if not inst.handoff:
                continue
            held = inst.sandbox.socket_inodes()
            if self.inode not in held:  # it closed the socket it was handed: it takes nothing from it any more
                dropped.append(inst.name)
            counts[inst.name] = len(table.accepted & held)
        return HandoffSample(counts, table.backlog, tuple(dropped))
