"""Addresses: ListenAddress (HOST:PORT, an IP address and never a name) and the kinds of keys that hold
addresses, networks and host names.

Pure: no I/O, nothing is resolved.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .kinds import Kind
from .units import show as _show


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __post_init__(self) -> None:
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 1-65535 (port 0 would pick a random port no "
                             "client could know)")

    @classmethod
    def parse(cls, text: Any) -> ListenAddress:
        """'host:port', '[v6]:port', ':port' or a bare port (binds every address); host is an IP address."""
        if isinstance(text, bool) or not isinstance(text, str | int):
            raise ValueError(f"expected HOST:PORT, got {_show(text)}")
        s = str(text).strip()
        if s.isdigit():
            return cls("0.0.0.0", int(s))
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\[\]]*):(\d{1,5})", s)
        if not m:
            raise ValueError(f"'{s}' is not HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080, :8080)")
        host = m.group(1) or m.group(3) or "0.0.0.0"
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            hint = ("; quote times like \"18:00\": unquoted, YAML 1.1 tools read them as numbers"
                    if re.fullmatch(r"\d{1,2}:\d{2}", s) else "")
            name = " (names are not resolved: give the address)" if re.fullmatch(r"[A-Za-z][A-Za-z0-9.-]*", host) \
                else ""
            raise ValueError(f"'{host}' in '{s}' is not an IP address{name} (e.g. 127.0.0.1:8080{hint})") from None
        if m.group(1) and ip.version != 6:
            raise ValueError(f"'{s}': brackets are for IPv6 addresses")
        return cls(str(ip), int(m.group(2) or m.group(4)))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Listen(Kind):
    """HOST:PORT, a list of them, or `systemd`: the sockets systemd passes with FileDescriptorName= the service's
    name (an empty tuple here; the lifecycle owner fills in their addresses)."""

    def parse(self, raw: Any) -> tuple[ListenAddress, ...]:
        if raw == "systemd":
            return ()
        items = raw if isinstance(raw, list) else [raw]
        if not items:
            raise ValueError("needs at least one address")
        if len(items) > 64:
            raise ValueError("more than 64 addresses")
        return tuple(ListenAddress.parse(v) for v in items)

    def describe(self) -> tuple[str, str]:
        return "HOST:PORT, a list of them, or systemd", ("an IP address (not a name) and a port 1-65535; up to 64 "
                                                         "addresses")

    def schema(self) -> dict[str, Any]:
        one = {"oneOf": [{"type": "string"}, {"type": "integer", "minimum": 1, "maximum": 65535}]}
        return {"oneOf": [one, {"type": "array", "items": one, "minItems": 1}, {"const": "systemd"}]}


@dataclass(frozen=True)
class Address(Kind):
    """One HOST:PORT, or null/off to disable."""

    def parse(self, raw: Any) -> ListenAddress | None:
        if raw is False or raw == "off":
            return None
        return ListenAddress.parse(raw)

    def describe(self) -> tuple[str, str]:
        return "HOST:PORT", "an IP address (not a name) and a port 1-65535"

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}, {"const": False}]}


@dataclass(frozen=True)
class Subnet(Kind):
    """An IPv4 network for instances, big enough for a gateway and a few instances, small enough to scan."""

    def parse(self, raw: Any) -> ipaddress.IPv4Network:
        if not isinstance(raw, str):
            raise ValueError(f"expected an IPv4 network like 10.89.0.0/24, got {_show(raw)}")
        try:
            net = ipaddress.IPv4Network(raw, strict=True)
        except ValueError as e:
            raise ValueError(f"'{raw}' is not an IPv4 network like 10.89.0.0/24 ({e})") from None
        if not 16 <= net.prefixlen <= 29:
            raise ValueError(f"'{raw}': use a prefix between /16 and /29")
        if net.is_loopback or net.is_multicast or net.is_link_local or not net.is_private:
            raise ValueError(f"'{raw}' is not a private network (use e.g. 10.89.0.0/24 or 192.168.250.0/24)")
        return net

    def describe(self) -> tuple[str, str]:
        return "IPv4 network", "a private network, /16 to /29"

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": r"^\d+\.\d+\.\d+\.\d+/\d+$"}


@dataclass(frozen=True)
class Hosts(Kind):
    """Extra /etc/hosts entries: {name: IP address}."""

    def parse(self, raw: Any) -> tuple[tuple[str, str], ...]:
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a mapping of host names to addresses, got {_show(raw)}")
        out = []
        for name, addr in raw.items():
            if not isinstance(name, str) or not _is_hostname(name):
                raise ValueError(f"'{str(name)[:60]}' is not a host name")
            try:
                out.append((name, str(ipaddress.ip_address(str(addr)))))
            except ValueError:
                raise ValueError(f"'{name}': '{addr}' is not an IP address") from None
        return tuple(out)

    def describe(self) -> tuple[str, str]:
        return "mapping {host name: IP address}", "host names of letters, digits, '-' and '.'"

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "propertyNames": {"pattern": r"^[A-Za-z0-9.-]{1,253}$"},
                "additionalProperties": {"type": "string"}}


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_hostname(name: str) -> bool:
    # Label by label: one regex over the whole name with nested repetition backtracks exponentially.
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))
