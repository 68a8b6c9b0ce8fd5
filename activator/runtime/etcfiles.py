"""An instance's /etc/hosts and /etc/resolv.conf, written by root into the image's tree before the app starts.

Every line is built from checked values (a name that could end its line or start a comment is refused in one
line), and every path is resolved inside the root filesystem (imagefs), so an image whose /etc is a symlink to a
host directory gets its own /etc written, not that.
"""

from __future__ import annotations

import contextlib
import ipaddress
import re
from pathlib import Path

from activator.errors import ActivatorError

from . import imagefs

#: a name in /etc/hosts: what a host name may hold, nothing that would end its line or start a comment
_HOSTS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,253}")


def write(root: Path, hostname: str, *, gateway: str | None, owner: int | None,
          extra_hosts: tuple[tuple[str, str], ...] = (), dependencies: tuple[str, ...] = ()) -> None:
    """/etc/hosts (and, on the bridge, where gateway is its address, /etc/resolv.conf) under root, owned by owner
    (None: left to imagefs).

    The hostname resolves to 127.0.0.1, not to the instance's address: the template's address is not an
    instance's, and a JVM caches what its hostname resolved to when it started, before the dump. Each
    dependency's name resolves to the gateway, where the dependency's listener (or its steering) is, as a
    Compose service's name resolves to its container."""
    lines = [hosts_line("127.0.0.1", "localhost", hostname), "::1\tlocalhost ip6-localhost ip6-loopback"]
    if gateway is not None:
        lines.append(hosts_line(gateway, "host.activator.internal"))
        lines += [hosts_line(gateway, name) for name in dependencies]
    lines += [hosts_line(addr, name) for name, addr in extra_hosts]
    if gateway is not None and not imagefs.replace_file(root, "/etc", "resolv.conf", resolv_conf(), owner=owner):
        return  # no /etc in the image
    imagefs.replace_file(root, "/etc", "hosts", "\n".join(lines) + "\n", owner=owner)


def hosts_line(addr: str, *names: str) -> str:
    """One /etc/hosts line from checked values (ActivatorError naming the value otherwise)."""
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ActivatorError(f"/etc/hosts: {addr!r} is not an IP address") from None
    for name in names:
        if not isinstance(name, str) or not _HOSTS_NAME.fullmatch(name):
            raise ActivatorError(f"/etc/hosts: {name!r} is not a host name (letters, digits, _ . - only)")
    return f"{addr}\t{' '.join(names)}"


def resolv_conf() -> str:
    """The host's name servers an instance can reach (as Docker does it): loopback ones are dropped, since they
    are the instance's own loopback in its namespace; systemd-resolved's upstream list is used when the host's
    file only names its stub resolver; with nothing left, Docker's fallback (public resolvers)."""
    servers, other = _read_resolv(Path("/etc/resolv.conf"))
    if not servers:
        servers, _ = _read_resolv(Path("/run/systemd/resolve/resolv.conf"))
    if not servers:
        servers = ["8.8.8.8", "8.8.4.4"]
    return "".join(f"nameserver {s}\n" for s in servers) + "".join(f"{line}\n" for line in other)


def _read_resolv(path: Path) -> tuple[list[str], list[str]]:
    servers: list[str] = []
    other: list[str] = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            words = line.split()
            if not words or words[0].startswith(("#", ";")):
                continue
            if words[0] == "nameserver" and len(words) > 1:
                if not (words[1].startswith("127.") or words[1] == "::1"):
                    servers.append(words[1])
            elif words[0] in ("search", "options"):
                other.append(line.strip())
    return servers, other
