"""The systemd protocols, spoken directly (no libsystemd): readiness/watchdog notifications and socket handoff.

- notify(): sd_notify(3) over $NOTIFY_SOCKET; a no-op when not started by systemd.
- watchdog_interval(): $WATCHDOG_USEC (for this PID): how often systemd expects WATCHDOG=1.
- listen_fds(): sd_listen_fds(3): sockets passed in as fds 3.. by a socket unit (or systemd-socket-activate),
  for this PID only. The variables are removed so no child (runc, CRIU) mistakes them for its own.
"""

from __future__ import annotations

import ipaddress
import os
import socket

from activator.config.addresses import ListenAddress

SD_LISTEN_FDS_START = 3


def notify(*states: str) -> bool:
    path = os.environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    addr = "\0" + path[1:] if path.startswith("@") else path  # '@' names an abstract socket
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
        try:
            s.sendto("\n".join(states).encode(), addr)
        except OSError:
            return False
    return True


def _for_us(var: str) -> bool:
    pid = os.environ.get(var)
    return pid is None or pid == str(os.getpid())


def watchdog_interval() -> float | None:
    usec = os.environ.get("WATCHDOG_USEC")
    if not usec or not _for_us("WATCHDOG_PID"):
        return None
    try:
        return int(usec) / 1e6
    except ValueError:
        return None


def listen_fds() -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed, each with its FileDescriptorName (LISTEN_FDNAMES; "" if unnamed)."""
    try:
        n = int(os.environ.get("LISTEN_FDS", "0"))
    except ValueError:
        n = 0
    ours = os.environ.get("LISTEN_PID") == str(os.getpid())
    names = os.environ.get("LISTEN_FDNAMES", "").split(":")
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(var, None)
    if not ours or n <= 0:
        return []
    socks = []
    for i, fd in enumerate(range(SD_LISTEN_FDS_START, SD_LISTEN_FDS_START + n)):
        os.set_inheritable(fd, False)
        socks.append((names[i] if i < len(names) else "", socket.socket(fileno=fd)))
    return socks


def same_address(sock: socket.socket, addr: ListenAddress, kind: int = socket.SOCK_STREAM) -> bool:
    """Does this bound socket listen on addr (a TCP one; kind SOCK_DGRAM: a UDP one)? Addresses compare as IPs
    ('::' == '0:0::0')."""
    if sock.type != kind or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return False
    host, port = sock.getsockname()[:2]
    try:
        return port == addr.port and ipaddress.ip_address(host) == ipaddress.ip_address(addr.host)
    except ValueError:
        return False
