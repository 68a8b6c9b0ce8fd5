"""The host's TCP socket table for one listening port, read through sock_diag (netlink): which connections on it
are alive, by socket inode, and how many wait in its accept queue.

With handoff (a service's listening socket handed into its instances), the connections are accepted by the apps
themselves, in the host's network namespace: nothing else tells the activator how many each instance holds. An
inode names a socket the moment an app accepts it (a connection still in the accept queue has inode 0, and is
counted in the listener's receive queue instead); which instance holds it is read from the apps' descriptor
tables (runtime.procs.socket_inodes).
"""

from __future__ import annotations

import socket
from dataclasses import dataclass

from pyroute2 import DiagSocket

TCP_LISTEN = 10
#: every TCP state but LISTEN (1 << state): a connection an app has accepted stays in the table until it is closed
#: on both sides, whatever it is doing meanwhile
ALIVE = ((1 << 12) - 1) & ~(1 << TCP_LISTEN)


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
