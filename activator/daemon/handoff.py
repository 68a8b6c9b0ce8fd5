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

Counting: the apps' connections live in the host's socket table (sockdiag.py); an instance's are those whose
inode is in its processes' descriptor tables. An instance to be reaped is frozen first (it can take no new
connection from the socket, and its table cannot change), counted, and killed frozen with none open, or thawed
and kept; a connection waiting in the accept queue meanwhile stays there for the next taker.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass

from activator.checkpoints.instance import Instance
from activator.config.model import ServiceConfig
from activator.net import sockdiag

from .listeners import BACKLOG

log = logging.getLogger("activator")


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
        self.listener.listen(BACKLOG)
        return True

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
