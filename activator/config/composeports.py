"""A Compose service's ports: its published ports as listen addresses, port and protocol; with none published,
the app port on the bridge's address only."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from activator.errors import ConfigError

from .composecontext import MARK, Context, all_of


def ports(body: Mapping[str, Any], own: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    """ports -> listen, port and protocol: the published ports of the one app port (x-activator's port, or the only
    one published); a second app port is refused (one app port per service). No published port: the app port
    (x-activator's, or the one exposed) on the bridge's address only, with a note."""
    raw, wanted = body.get("ports"), own.get("port")
    if raw is not None and not isinstance(raw, list):
        raise ctx.error("ports", "expected a list")
    mappings: list[tuple[str, int, int, str]] = []
    bad: list[str] = []
    for p in raw or []:
        try:
            mappings.append(_port(p, ctx))
        except ConfigError as e:
            bad.append(str(e))
    if bad:
        raise all_of(bad)
    if not mappings:
        return _internal(body, own, ctx)
    targets = sorted({m[2] for m in mappings})
    if wanted is None and len(targets) > 1:
        raise ctx.error("ports", f"these publish ports {', '.join(map(str, targets))} of the app, and activator "
                                 f"serves one app port per service; keep one, or pick it with {MARK}: {{port: N}} and "
                                 "split the others into their own service")
    target = wanted if wanted is not None else targets[0]
    chosen = [m for m in mappings if m[2] == target]
    if not chosen:
        raise ctx.error("ports", f"no published port for port {target} ({MARK}'s port): these publish port"
                                 f"{'s' if len(targets) > 1 else ''} {', '.join(map(str, targets))}; publish {target} "
                                 f"(\"127.0.0.1:{target}:{target}\") or remove it from the ports")
    others = sorted({m[2] for m in mappings} - {target})
    if others:
        raise ctx.error("ports", f"port {others[0]} is published too, and activator serves one app port per service "
                                 f"(port: {target}); remove it or serve it as a service of its own")
    if unserved := sorted({p for p, _ in _exposed(body.get("expose"), ctx)} - {target}):
        ctx.note("expose", f"port {unserved[0]} is not served: the published ports are ({target}); expose names "
                           "the app's port only when none is published")
    by_proto: dict[str, list[str]] = {}
    for host, published, _, proto in chosen:
        address = f"[{host}]:{published}" if ":" in host else f"{host}:{published}"
        if address not in by_proto.setdefault(proto, []):
            by_proto[proto].append(address)
    protocols = sorted(by_proto)  # tcp before udp
    listen = by_proto[protocols[0]]
    if len(protocols) == 2 and sorted(by_proto["tcp"]) != sorted(by_proto["udp"]):
        raise ctx.error("ports", f"port {target} is published for TCP on {', '.join(by_proto['tcp'])} and for UDP on "
                                 f"{', '.join(by_proto['udp'])}; activator serves both protocols on the same "
                                 "addresses: publish the same ones for both")
    out: dict[str, Any] = {"listen": listen if len(listen) > 1 else listen[0], "port": target}
    if protocols != ["tcp"]:
        out["protocol"] = protocols if len(protocols) > 1 else protocols[0]
    return out


def _internal(body: Mapping[str, Any], own: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    """A service with no published port (a database, a cache): served on the bridge's address, where the other
    services' instances reach it, and nothing off this host does."""
    exposed = _exposed(body.get("expose"), ctx)
    port = own.get("port")
    if port is None:
        ports = sorted({p for p, _ in exposed})
        if len(ports) != 1:
            have = "no published port" if not ports else \
                f"no published port, and it exposes {', '.join(map(str, ports))}"
            raise ctx.error("ports", f"{have}: say which port the app listens on with expose: [\"PORT\"] (or {MARK}: "
                                     f"{{port: PORT}}) to serve it to the other services on the bridge's address "
                                     f"{ctx.gateway} only, or publish it for clients on this host "
                                     "(\"127.0.0.1:PORT:PORT\")")
        port = ports[0]
    protocols = sorted({proto for p, proto in exposed if p == port}) or ["tcp"]
    listen = own.get("listen", f"{ctx.gateway}:{port}")
    name = ctx.at.rsplit(".", 1)[1]
    if "listen" not in own:
        ctx.tell("ports", f"none published: served on {listen} only (the bridge's address), where the other "
                          f"services reach it ({name}:{port} with depends_on: [{name}]) and so does this host, "
                          "nothing else; publish a port to serve other clients")
    out: dict[str, Any] = {"listen": listen, "port": port}
    if protocols != ["tcp"]:
        out["protocol"] = protocols if len(protocols) > 1 else protocols[0]
    return out


def _exposed(raw: Any, ctx: Context) -> list[tuple[int, str]]:
    """expose: PORT[/PROTOCOL] (a number or a string; a range is refused) -> (port, protocol)."""
    if raw is None:
        return []
    if not isinstance(raw, list):
        raise ctx.error("expose", "expected a list of PORT or PORT/PROTOCOL")
    out = []
    for item in raw:
        text, _, proto = str(item).partition("/")
        if proto not in ("", "tcp", "udp") or not text.isdigit():
            raise ctx.error("expose", f"'{str(item)[:40]}': expected PORT, PORT/tcp or PORT/udp (one port, no range)")
        out.append((_number(text, ctx), proto or "tcp"))
    return out


def _port(p: Any, ctx: Context) -> tuple[str, int, int, str]:
    if isinstance(p, Mapping):
        proto = str(p.get("protocol", "tcp"))
        if proto not in ("tcp", "udp"):
            raise ctx.error("ports", f"protocol {proto[:20]}: only TCP and UDP ports can be served")
        if p.get("published") is None or p.get("target") is None:
            raise ctx.error("ports", "a port needs both published and target")
        return (str(p.get("host_ip") or "0.0.0.0"), _number(p["published"], ctx), _number(p["target"], ctx),
                proto)
    text = str(p)
    text, _, proto = text.partition("/")
    if proto not in ("", "tcp", "udp"):
        raise ctx.error("ports", f"'{str(p)[:60]}': only TCP and UDP ports can be served (/tcp, /udp)")
    m = re.fullmatch(r"(?:(\[[0-9a-fA-F:.]+\]|[0-9.]+):)?(\d+):(\d+)", text)
    if m is None:
        raise ctx.error("ports", f"'{str(p)[:60]}': expected [HOST_IP:]PUBLISHED:TARGET[/udp] with one published "
                                 "port")
    host = (m.group(1) or "0.0.0.0").strip("[]")
    return host, _number(m.group(2), ctx), _number(m.group(3), ctx), proto or "tcp"


def _number(v: Any, ctx: Context) -> int:
    try:
        return int(str(v))
    except ValueError:
        raise ctx.error("ports", f"'{str(v)[:20]}' is not a port number") from None
