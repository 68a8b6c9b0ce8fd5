"""The host's TCP socket table for one listening port, read through sock_diag (netlink): which connections on it
are alive, by socket inode, and how many wait in its accept queue.

With handoff (a service's listening socket handed into its instances), the connections are accepted by the apps
themselves, in the host's network namespace: nothing else tells the activator how many each instance holds. An
inode names a socket the moment an app accepts it (a connection still in the accept queue has inode 0, and is
counted in the listener's receive queue instead); which instance holds it is read from the apps' descriptor
tables (runtime.procs.socket_inodes).

The listener itself is looked up exactly (`keyed`): whether an app gave it TCP-MD5 keys.
"""

from __future__ import annotations

import os
import socket
import struct
from dataclasses import dataclass

from pyroute2 import DiagSocket
from pyroute2.netlink import NLM_F_REQUEST
from pyroute2.netlink.diag import SOCK_DIAG_BY_FAMILY, inet_diag_req

TCP_LISTEN = 10
#: every TCP state but LISTEN (1 << state): a connection an app has accepted stays in the table until it is closed
#: on both sides, whatever it is doing meanwhile
ALIVE = ((1 << 12) - 1) & ~(1 << TCP_LISTEN)
INET_DIAG_INFO = 2
SO_BINDTOIFINDEX = 62  # asm-generic/socket.h: the index of the device SO_BINDTODEVICE named (0: none)
NOCOOKIE = (1 << 64) - 1  # INET_DIAG_NOCOOKIE in both halves: any socket that matches the address


@dataclass(frozen=True)
class PortSockets:
    accepted: frozenset[int]  # inodes of the connections apps hold on the port
    backlog: int  # connections in the listener's accept queue, not yet taken by anyone


def read(family: int, port: int) -> PortSockets:
    """Blocking (~2-3 ms through pyroute2)."""
    with DiagSocket() as diag:
        diag.bind()
        rows = diag.get_sock_stats(family=family, protocol=socket.IPPROTO_TCP, states=ALIVE | (1 << TCP_LISTEN),
                                   sport=port)
    accepted = set()
    backlog = 0
    for row in rows:
        if row["idiag_sport"] != port:
            continue
        if row["idiag_state"] == TCP_LISTEN:
            backlog += int(row["idiag_rqueue"])
        elif row["idiag_inode"]:
            accepted.add(int(row["idiag_inode"]))
    return PortSockets(frozenset(accepted), backlog)


def keyed(sock: socket.socket) -> bool:
    """Blocking (~1 ms): whether the listening socket has TCP-MD5 keys (RFC 2385; a SYN from a keyed peer that
    lacks the signature is dropped, for every holder of the socket).

    One exact lookup by its address, port and device (a socket bound to one is found only with it), not a dump of
    the host's table, checked to be this very socket by its inode: LookupError if it is not there (not listening).
    The kernel reports the keys only with INET_DIAG_INFO asked for, to a reader with CAP_NET_ADMIN (the daemon has
    it: it makes network namespaces)."""
    host, port = sock.getsockname()[:2]
    device = sock.getsockopt(socket.SOL_SOCKET, SO_BINDTOIFINDEX)  # by index: it may be gone
    req = inet_diag_req()
    req["sdiag_family"], req["sdiag_protocol"] = sock.family, socket.IPPROTO_TCP
    req["idiag_ext"], req["idiag_states"] = 1 << (INET_DIAG_INFO - 1), 1 << TCP_LISTEN
    req["idiag_sport"], req["idiag_dport"] = port, 0
    req["idiag_src"] = struct.unpack(">4I", socket.inet_pton(sock.family, host).ljust(16, b"\0"))
    req["idiag_dst"], req["idiag_cookie"] = (0, 0, 0, 0), NOCOOKIE
    req["idiag_if"] = device
    inode = os.fstat(sock.fileno()).st_ino
    with DiagSocket() as diag:
        diag.bind()
        rows = tuple(diag.nlm_request(req, SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST))
    ours = [row for row in rows if row.get("idiag_inode") == inode]  # an error comes back as a row without one
    if not ours:
        raise LookupError("the listening socket is not in the host's socket table")
    return any(row.get_attr("INET_DIAG_MD5SIG") is not None for row in ours)
