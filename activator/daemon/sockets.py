"""Listening sockets themselves (what accepts on them is servicelisteners.py): the ones handed in (by systemd's
LISTEN_FDS, or by a caller such as a test) matched to services by address, and the rest bound here. A port in
use fails here, before anything else starts."""

from __future__ import annotations

import errno
import logging
import socket

from activator.config.addresses import ListenAddress
from activator.config.document import Config
from activator.config.service import ServiceConfig
from activator.errors import ActivatorError

from . import systemd

log = logging.getLogger("activator")

BACKLOG = 1024


IP_FREEBIND = 15  # linux/in.h; Python's socket module does not name it


def bind_listener(addr: ListenAddress, svc: ServiceConfig, config: Config, *, udp: bool = False) -> socket.socket:
    """The listening TCP socket for addr (udp: the bound UDP socket)."""
    family = socket.AF_INET6 if ":" in addr.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_DGRAM if udp else socket.SOCK_STREAM)
    try:
        if not udp:  # for UDP it would let another process bind the same port too, and take half the datagrams
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if addr.host == str(next(config.settings.network.subnet.hosts())):
            # the bridge's address (where dependants reach a dependency): the bridge may not be up yet (validate)
            sock.setsockopt(socket.IPPROTO_IP, IP_FREEBIND, 1)
        sock.bind((addr.host, addr.port))
        if not udp:
            sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        why = {
            errno.EADDRINUSE: "is already in use by another process; stop it or pick another port",
            errno.EADDRNOTAVAIL: "is not an address of this host; fix the host part",
            errno.EACCES: "needs more privileges",
        }.get(e.errno or 0, e.strerror or str(e))
        raise ActivatorError(f"{config.path}: services.{svc.name}.listen: {addr}{' (UDP)' if udp else ''} {why}"
                             ) from None
    sock.setblocking(False)
    return sock


def udp_sockets(svc: ServiceConfig, config: Config, have: list[socket.socket]) -> list[socket.socket]:
    """A bound UDP socket for each of a `protocol: udp` service's listen addresses that `have` lacks. All or
    none."""
    out: list[socket.socket] = []
    if "udp" not in svc.protocol:
        return out
    try:
        for addr in svc.listen:
            if not any(systemd.same_address(s, addr, socket.SOCK_DGRAM) for s in have):
                out.append(bind_listener(addr, svc, config, udp=True))
    except BaseException:
        for sock in out:
            sock.close()
        raise
    return out


def take_all(config: Config, handed_in: list[tuple[str, socket.socket]]
             ) -> list[tuple[ServiceConfig, socket.socket]]:
    """Every listen address gets a socket: the one handed in for it if any, else one bound here; a service with
    `listen: systemd` gets the sockets named after it (FileDescriptorName=). A socket handed in that matches no
    address is an error (it would silently accept connections nobody serves)."""
    named = list(handed_in)
    left = [sock for _name, sock in handed_in]
    out: list[tuple[ServiceConfig, socket.socket]] = []
    try:
        for svc in config.services:
            if not svc.listen:
                mine = [sock for name, sock in named if name == svc.name]
                if not mine:
                    raise ActivatorError(
                        f"{config.path}: services.{svc.name}.listen is systemd, but no socket named '{svc.name}' "
                        f"was passed in; give its socket unit FileDescriptorName={svc.name} (and "
                        "Service=activator.service)")
                for sock in mine:
                    left.remove(sock)
                    sock.setblocking(False)
                    log.info("service=%s using the socket systemd passed in as '%s' (%s)", svc.name, svc.name,
                             address_of(sock))
                    out.append((svc, sock))
                continue
            for addr in svc.listen if "tcp" in svc.protocol else ():
                match = next((s for s in left if systemd.same_address(s, addr)), None)
                if match is not None:
                    left.remove(match)
                    match.setblocking(False)
                    log.info("service=%s using the socket passed in for %s", svc.name, addr)
                    out.append((svc, match))
                else:
                    out.append((svc, bind_listener(addr, svc, config)))
            out += [(svc, sock) for sock in udp_sockets(svc, config, [])]
        if left:
            where = left[0].getsockname()
            raise ActivatorError(
                f"{config.path}: a socket passed in ({where}) matches no service's listen address; "
                "add it to a service or remove it from the socket unit"
            )
    except BaseException:
        for _svc, sock in out:
            sock.close()
        for sock in left:
            sock.close()
        raise
    return out


def address_of(sock: socket.socket) -> ListenAddress:
    host, port = sock.getsockname()[:2]
    return ListenAddress(host, port)
