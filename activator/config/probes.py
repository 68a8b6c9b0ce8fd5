"""probes: the health checks the activator answers itself while a service sleeps (who asks, and what), and the
part of them that shapes the checkpoint.

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .kinds import Kind
from .units import show as _show

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


@dataclass(frozen=True)
class Probe:
    """A health check the activator answers itself while the service sleeps (see ServiceConfig.probes)."""

    sources: tuple[Network, ...]  # who the prober is (`from`)
    http: str | None = None  # a GET or HEAD of this request-target, answered as the template answered it
    tcp: bool = False  # a connection that sends nothing and closes: answered by being accepted

    def matches_source(self, ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
        if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped  # a dual-stack listener sees IPv4 clients as ::ffff:a.b.c.d
        return any(ip in net for net in self.sources)


@dataclass(frozen=True)
class Probes(Kind):
    """probes: a list of {http: PATH | tcp: true, from: [CIDR, ...]}."""

    def parse(self, raw: Any) -> tuple[Probe, ...]:
        items = [raw] if isinstance(raw, Mapping) else raw
        if not isinstance(items, list):
            raise ValueError(f"expected a list of {{http: /path, from: [CIDR]}} or {{tcp: true, from: [CIDR]}}, "
                             f"got {_show(raw)}")
        if len(items) > 32:
            raise ValueError("more than 32 probes")
        return tuple(self._one(i, item) for i, item in enumerate(items))

    def _one(self, i: int, item: Any) -> Probe:
        if not isinstance(item, Mapping) or not set(map(str, item)) <= {"http", "tcp", "from"}:
            raise ValueError(f"[{i}]: expected {{http: /path, from: [CIDR]}} or {{tcp: true, from: [CIDR]}}, got "
                             f"{_show(item)}")
        http, tcp, sources = item.get("http"), item.get("tcp", False), item.get("from")
        if http is not None and (not isinstance(http, str) or not re.fullmatch(r"/[\x21-\x7e]{0,1000}", http)):
            raise ValueError(f"[{i}].http: {_show(http)} is not an absolute URL path like /healthz")
        if not isinstance(tcp, bool):
            raise ValueError(f"[{i}].tcp: expected true or false, got {_show(tcp)}")
        if (http is None) == (not tcp):
            raise ValueError(f"[{i}]: give http: /path or tcp: true (one of them)")
        if isinstance(sources, str):
            sources = [sources]
        if not isinstance(sources, list) or not sources or not all(isinstance(x, str) for x in sources):
            raise ValueError(f"[{i}].from: the prober's addresses are required, e.g. [10.0.0.0/8] (a probe is "
                             "recognised by where it comes from)")
        nets = []
        for text in sources[:64]:
            try:
                nets.append(ipaddress.ip_network(text, strict=False))
            except ValueError:
                raise ValueError(f"[{i}].from: '{text[:60]}' is not an address or a CIDR network") from None
        return Probe(tuple(nets), http, tcp)

    def describe(self) -> tuple[str, str]:
        return "list of {http: PATH, from: [CIDR]} or {tcp: true, from: [CIDR]}", "up to 32 probes"

    def schema(self) -> dict[str, Any]:
        one = {"type": "object", "additionalProperties": False, "required": ["from"],
               "properties": {"http": {"type": "string", "pattern": "^/"}, "tcp": {"type": "boolean"},
                              "from": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}
        return {"type": "array", "items": one, "maxItems": 32}


def probe_paths(probes: tuple[Probe, ...]) -> list[str]:
    """What of the probes shapes the checkpoint: the paths whose answers it records (not who asks)."""
    return sorted({p.http for p in probes if p.http is not None})
