"""A services file as a whole: Config (its settings and services), what relates its services (no two sockets on
one address, dependencies reachable and acyclic), and the file's JSON Schema.

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activator.errors import ConfigError

from .addresses import ListenAddress
from .declare import object_schema
from .service import NAME_PATTERN, ServiceConfig
from .settings import Settings


@dataclass(frozen=True)
class Config:
    path: Path
    settings: Settings
    services: tuple[ServiceConfig, ...]
    notes: tuple[str, ...] = ()  # what a Compose file said that activator ignores, and why (validate prints them)

    def shares_memory(self, svc: ServiceConfig) -> bool:
        """share_memory, with auto resolved: on only when the file has this one service."""
        return svc.share_memory is True or (svc.share_memory == "auto" and len(self.services) == 1)

    def service(self, name: str) -> ServiceConfig:
        for s in self.services:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.services)
        raise ConfigError(f"{self.path}: no service named '{name}' (known: {known})")


def _covers(a: ListenAddress, b: ListenAddress) -> bool:
    """Does a socket bound to a hold b's address too (the same, or a wildcard over it)? [::] is dual-stack
    (activator does not set IPV6_V6ONLY), so it holds IPv4 addresses as well."""
    if a.port != b.port:
        return False
    if a.host == b.host:
        return True
    wild, other = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    return wild.is_unspecified and (wild.version == other.version or wild.version == 6)


def check_listeners(services: list[ServiceConfig], settings: Settings | None, where: str) -> list[ConfigError]:
    """No two sockets of the daemon on one address and port, nor a wildcard address and a specific one on the same
    port: each binds alone, the second one fails at start (EADDRINUSE)."""
    taken: list[tuple[str, str, ListenAddress, frozenset[str]]] = []  # (key, owner, address, protocols)
    for svc in services:
        taken += [(f"services.{svc.name}.listen", f"service '{svc.name}'", a, frozenset(svc.protocol))
                  for a in svc.listen]
    if settings is not None and settings.metrics is not None:
        taken.append(("settings.metrics", "settings.metrics", settings.metrics, frozenset({"tcp"})))
    if settings is not None and settings.agent is not None:
        taken.append(("settings.agent.listen", "settings.agent", settings.agent.listen, frozenset({"tcp"})))
    problems: list[ConfigError] = []
    for j, (k, owner, addr, protos) in enumerate(taken):
        for _k0, owner0, addr0, protos0 in taken[:j]:
            if not (_covers(addr0, addr) or _covers(addr, addr0)) or (addr != addr0 and not protos & protos0):
                continue  # (the same address twice is refused whatever the protocols: one kernel path per address)
            whose = "this service" if owner0 == owner else owner0
            if addr == addr0:
                problems.append(ConfigError(f"{where}: {k}: {addr} is already used by {whose}"))
            else:
                wild = addr if ipaddress.ip_address(addr.host).is_unspecified else addr0
                every = "every IPv6 and IPv4 address" if ":" in wild.host else "every IPv4 address"
                problems.append(ConfigError(
                    f"{where}: {k}: {addr} collides with {addr0} of {whose}: {wild} takes port {addr.port} on "
                    f"{every} of the host, so the second socket cannot be bound; use one address for both, "
                    "specific addresses for each, or another port"))
            break
    return problems


def check_dependencies(services: list[ServiceConfig], failed: set[str], gateway: str, where: str
                        ) -> list[ConfigError]:
    """Every dependency is a service of the file, reachable from its dependant, and no cycle. (A dependency whose
    own definition has problems is left out: those are said already.)"""
    by_name = {s.name: s for s in services}
    problems: list[ConfigError] = []
    for svc in services:
        at = f"{where}: services.{svc.name}.depends_on"
        for dep in svc.depends_on:
            other = by_name.get(dep)
            if dep in failed:
                continue
            if other is None:
                problems.append(ConfigError(f"{at}: no service named '{dep}' in this file (known: "
                                            f"{', '.join(sorted(by_name.keys() | failed)) or 'none'})"))
            elif svc.network != "bridge" or not svc.egress:
                problems.append(ConfigError(
                    f"{at}: this service cannot open connections (network: {svc.network}, egress: "
                    f"{str(svc.egress).lower()}); give it network: bridge and egress: true"))
            elif not dependency_address(other, gateway):
                problems.append(ConfigError(
                    f"{at}: '{dep}' listens on {', '.join(map(str, other.listen)) or 'systemd'}, which instances "
                    f"cannot reach; add {gateway}:PORT (the bridge's address) or 0.0.0.0:PORT to its listen"))
            else:
                continue
            break
    if problems:
        return problems
    state: dict[str, int] = {}  # 1: on the path being walked, 2: done

    def walk(name: str, path: list[str]) -> None:
        if state.get(name) == 2:
            return
        if state.get(name) == 1:
            cycle = [*path[path.index(name):], name]
            raise ConfigError(f"{where}: services.{cycle[0]}.depends_on: a cycle ({' -> '.join(cycle)}); a "
                              "dependency cannot depend on its dependant")
        state[name] = 1
        for dep in by_name[name].depends_on:
            if dep in by_name:
                walk(dep, [*path, name])
        state[name] = 2

    try:
        for svc in services:
            walk(svc.name, [])
    except ConfigError as e:
        return [e]
    return []


def dependency_address(svc: ServiceConfig, gateway: str) -> ListenAddress | None:
    """The listen address a dependant's instances reach svc on: the gateway's (the bridge's address), or a
    wildcard one (through the gateway too)."""
    return next((a for a in svc.listen if a.host == gateway), None) or \
        next((a for a in svc.listen if a.host == "0.0.0.0"), None)


def json_schema() -> dict[str, Any]:
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "activator services file",
        "type": "object",
        "properties": {
            "settings": object_schema(Settings),
            "services": {"type": "object", "propertyNames": {"pattern": NAME_PATTERN},
                         "additionalProperties": object_schema(ServiceConfig)},
        },
        "required": ["services"],
        "additionalProperties": False,
    }
