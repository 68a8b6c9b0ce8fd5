"""Network namespaces: one per instance, made with unshare(2) and a bind mount (as `ip netns add` does), lo brought
up with pyroute2 before the app arrives.

Sockets toward an instance are opened *inside* its namespace: the calling thread switches to the namespace,
creates the socket and switches back. A socket keeps the namespace it was created in, so after that it is an
ordinary socket the event loop can connect and splice. No veth, no addresses, no routes: the instance's app is
reached on its own 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import socket
import threading
from pathlib import Path

from pyroute2 import IPRoute, netns

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
CLONE_NEWNET = 0x40000000
MS_BIND = 4096
MS_REC, MS_SHARED = 16384, 1 << 20
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8

log = logging.getLogger("activator.netns")
_low_ports_warned = False

NETNS_DIR = Path("/run/netns")
PREFIX = "activator-"


# The namespace activator itself runs in; every thread returns to it after a setns. Opened at import, on the
# main thread, before anything has switched namespaces (opened lazily, a worker thread could catch the main
# thread inside an instance's namespace during a socket() call).
HOME_NS = os.open("/proc/self/ns/net", os.O_RDONLY | os.O_CLOEXEC)


_dir_lock = threading.Lock()
_dir_ready = False


def _netns_dir() -> None:
    """/run/netns as iproute2 makes it: a shared mount of itself. If it is a plain directory, the first `ip netns
    add` anyone runs after us bind-mounts it onto itself, which hides the namespaces pinned there (they can then be
    neither unmounted nor removed: EBUSY, docs/host-notes.md)."""
    global _dir_ready
    with _dir_lock:
        if _dir_ready:
            return
        NETNS_DIR.mkdir(parents=True, exist_ok=True)
        if _libc.mount(b"none", str(NETNS_DIR).encode(), None, MS_SHARED | MS_REC, None) != 0:
            # not a mount point yet: make it one (with what is mounted below it), then shared
            if _libc.mount(str(NETNS_DIR).encode(), str(NETNS_DIR).encode(), None, MS_BIND | MS_REC, None) != 0:
                raise _oserror(f"bind-mounting {NETNS_DIR} on itself")
            if _libc.mount(b"none", str(NETNS_DIR).encode(), None, MS_SHARED | MS_REC, None) != 0:
                raise _oserror(f"making {NETNS_DIR} a shared mount")
        _dir_ready = True


class NetNamespace:
    """A named namespace at /run/netns/<name> and an open fd on it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.path = NETNS_DIR / name
        self._fd: int | None = None

    @classmethod
    def create(cls, name: str) -> NetNamespace:
        """Blocking: call from a worker thread.

        The calling thread unshares into a new namespace, pins it with a bind mount at /run/netns/<name> (as
        `ip netns add` does), brings lo up from inside and returns home. pyroute2's netns.create() forks a
        helper for this, and forking the whole daemon per restore showed up as the largest part of
        restoring many services at once.
        """
        ns = cls(name)
        _netns_dir()
        os.close(os.open(ns.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                raise _oserror("unshare(CLONE_NEWNET)")
            try:
                if _libc.mount(b"/proc/thread-self/ns/net", str(ns.path).encode(), None, MS_BIND, None) != 0:
                    raise _oserror(f"bind-mounting the namespace on {ns.path}")
                _set_up()  # already inside it
            finally:
                netns.setns(HOME_NS)
            ns._fd = os.open(ns.path, os.O_RDONLY | os.O_CLOEXEC)
        except BaseException:
            ns.remove()
            raise
        return ns

    @classmethod
    def create_owned(cls, name: str, pid: int) -> NetNamespace:
        """Blocking. The network namespace process pid is in (made by it, owned by its user namespace: a template's,
        so that `runc exec` into the template, which joins the user namespace first, may join this one too),
        pinned at /run/netns/<name> and set up as create() sets up its own."""
        ns = cls(name)
        _netns_dir()
        os.close(os.open(ns.path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0o444))
        try:
            if _libc.mount(f"/proc/{pid}/ns/net".encode(), str(ns.path).encode(), None, MS_BIND, None) != 0:
                raise _oserror(f"bind-mounting the namespace on {ns.path}")
            netns.setns(ns.fd)
            try:
                _set_up()
            finally:
                netns.setns(HOME_NS)
        except BaseException:
            ns.remove()
            raise
        return ns

    @property
    def fd(self) -> int:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        return self._fd

    def mount_sysfs(self, target: Path) -> None:
        """Blocking. A sysfs of this namespace (its /sys/class/net lists the instance's own interfaces) mounted
        read-only on target: an app in a user namespace may not mount one itself, since the namespace is not its
        user namespace's (made outside it, ahead of time), so it gets this one bound in."""
        target.mkdir(mode=0o755, exist_ok=True)
        netns.setns(self.fd)
        try:
            if _libc.mount(b"sysfs", str(target).encode(), b"sysfs", MS_RDONLY | MS_NOSUID | MS_NODEV | MS_NOEXEC,
                           None) != 0:
                raise _oserror(f"mounting a sysfs on {target}")
        finally:
            netns.setns(HOME_NS)

    def socket(self, family: int = socket.AF_INET, kind: int = socket.SOCK_STREAM) -> socket.socket:
        """A non-blocking socket (TCP unless told) that lives in this namespace. Cheap (two setns calls, no
        awaits)."""
        netns.setns(self.fd)
        try:
            sock = socket.socket(family, kind)
        finally:
            netns.setns(HOME_NS)
        sock.setblocking(False)
        return sock

    def remove(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path.exists():
            with contextlib.suppress(OSError):
                netns.remove(self.name)
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()  # a mount point whose mount never happened


def _set_up() -> None:
    """In the calling thread's (new) namespace: lo up, low ports open."""
    # pyroute2's sync IPRoute talks to this thread's namespace.
    with IPRoute() as ipr:
        (idx,) = ipr.link_lookup(ifname="lo")
        ipr.link("set", index=idx, state="up")
    # An app in a user namespace holds no capability over a namespace made outside it, so binding a port below
    # 1024 would need one; Docker opens them in every container's namespace.
    try:
        with open("/proc/sys/net/ipv4/ip_unprivileged_port_start", "w") as f:
            f.write("0")
    except OSError as e:  # /proc/sys read-only: activator itself runs in a container
        global _low_ports_warned
        if not _low_ports_warned:
            _low_ports_warned = True
            log.warning("cannot open ports below 1024 to instances (net.ipv4.ip_unprivileged_port_start: %s): an "
                        "app in a user namespace that listens on one fails; give it a higher port or "
                        "'userns: host'", e.strerror)


def _oserror(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")
