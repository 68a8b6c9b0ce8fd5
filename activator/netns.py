"""Network namespaces: one per instance, made with pyroute2, lo brought up before the app arrives.

Sockets toward an instance are opened *inside* its namespace: the calling thread switches to the namespace,
creates the socket and switches back. A socket keeps the namespace it was created in, so after that it is an
ordinary socket the event loop can connect and splice. No veth, no addresses, no routes: the instance's app is
reached on its own 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import socket
from pathlib import Path

from pyroute2 import IPRoute, netns

NETNS_DIR = Path("/run/netns")
PREFIX = "activator-"


# The namespace activator itself runs in; every thread returns to it after a setns. Opened at import, on the
# main thread, before anything has switched namespaces (opened lazily, a worker thread could catch the main
# thread inside an instance's namespace during a socket() call).
_HOME_NS = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


class NetNamespace:
    """A named namespace at /run/netns/<name> and an open fd on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = NETNS_DIR / name
        self._fd: int | None = None

    @classmethod
    def create(cls, name: str) -> NetNamespace:
        """Blocking (pyroute2 forks a helper): call from a thread."""
        ns = cls(name)
        netns.create(name)
        try:
            ns._fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
            ns._set_lo_up()
        except BaseException:
            ns.remove()
            raise
        return ns

    def _set_lo_up(self) -> None:
        # Runs in a worker thread: setns only moves this thread, and pyroute2's sync IPRoute needs a thread
        # without a running event loop anyway.
        netns.setns(self.fd)
        try:
            with IPRoute() as ipr:
                (idx,) = ipr.link_lookup(ifname="lo")
                ipr.link("set", index=idx, state="up")
        finally:
            netns.setns(_HOME_NS)

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        """A non-blocking TCP socket that lives in this namespace. Cheap (two setns calls, no awaits)."""
        netns.setns(self.fd)
        try:
            sock = socket.socket(family, socket.SOCK_STREAM)
        finally:
            netns.setns(_HOME_NS)
        sock.setblocking(False)
        return sock

    def remove(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path.exists():
            with contextlib.suppress(OSError):
                netns.remove(self.name)
