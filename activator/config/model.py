"""Configuration: YAML in, frozen and validated objects out.

A file looks like this (compose-like, so Docker users read it at a glance)::

    settings:                         # optional: every key has a default
      state_dir: /var/lib/activator   # the default
      metrics: 127.0.0.1:9464         # the default; null to disable
      drain_timeout: 10s              # the default
    services:
      tomcat:
        image: activator-demo/tomcat:latest   # required
        listen: 127.0.0.1:8080        # required; or a list of addresses
        port: 8080                    # required: where the app listens inside its container
        environment: {JAVA_OPTS: -Xmx256m}        # an example (default: the image's environment only)
        readiness: {http_path: /, timeout: 60s}   # an example (default: listening is enough, within 60s)
        idle_timeout: 5m              # the default
        max_instances: 4              # an example: the default is 1, so no scale-out unless set

Every key, its default, its bounds and what it means are declared once, on the dataclass fields below
(`key(...)`); the parser, the unknown-key check, the error messages, the JSON Schema
(config/activator.schema.json, `activator schema`) and the reference (docs/configuration.md, `activator schema
--markdown`, core/reference.py) are all derived from those declarations.

Invalid, each refused with one line naming the file, the service and the key, and what would be valid (every
problem of a file is said, each on its line: ConfigErrors)::

    services: {web: {image: x, listen: 8080, port: 80, colour: red}}      # unknown key 'colour'
    services: {web: {image: x, listen: "127.0.0.1:99999", port: 80}}     # port out of range
    services: {web: {image: x, listen: 18:00, port: 80}}                 # '18' is not an IP address
    services: {web: {image: x, listen: 8080, port: 80, idle_timeout: .nan}}   # not a finite duration

Durations are seconds (a number) or strings with a unit: 250ms, 5s, 2m, 1h, 1d, or several (1m30s). Sizes are
bytes or strings with k/m/g (binary). Nothing here touches the network, Docker or the filesystem beyond reading the
file.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import ipaddress
import json
import math
import os
import re
import signal
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

from activator.errors import ConfigError, combined

from . import compose, schedule, yamlload
from .units import DURATION_PATTERN, SIZE_PATTERN, parse_duration, parse_size
from .units import show as _show

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,39}$"
_NAME_RE = re.compile(NAME_PATTERN)

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
MiB = 2**20


def _human_duration(seconds: float) -> str:
    if seconds == 0:
        return "0"
    for unit, size in (("d", DAY), ("h", HOUR), ("m", MINUTE), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms"


# --- value kinds: each parses one YAML value and describes itself in JSON Schema ------------------------------


class Kind:
    def parse(self, raw: Any) -> Any:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError


@dataclass(frozen=True)
class Duration(Kind):
    min: float
    max: float

    def parse(self, raw: Any) -> float:
        value = parse_duration(raw)
        if not self.min <= value <= self.max:
            raise ValueError(f"{_human_duration(value)} is out of range: "
                             f"use {_human_duration(self.min)} to {_human_duration(self.max)}")
        return value

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "number", "minimum": self.min, "maximum": self.max},
                          {"type": "string", "pattern": DURATION_PATTERN}],
                "description": f"a duration, {_human_duration(self.min)} to {_human_duration(self.max)} "
                               "(seconds, or 250ms, 5s, 2m, 1h, 1d)"}


@dataclass(frozen=True)
class Size(Kind):
    min: int
    max: int

    def parse(self, raw: Any) -> int:
        value = parse_size(raw)
        if not self.min <= value <= self.max:
            raise ValueError(f"{value} bytes is out of range: use {self.min // MiB}m to {self.max // 2**30}g")
        return value

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "integer", "minimum": self.min, "maximum": self.max},
                          {"type": "string", "pattern": SIZE_PATTERN}]}


@dataclass(frozen=True)
class Int(Kind):
    min: int
    max: int

    def parse(self, raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected a whole number, got {_show(raw)}")
        if not self.min <= raw <= self.max:
            raise ValueError(f"{raw} is out of range: use {self.min} to {self.max}")
        return raw

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.min, "maximum": self.max}


@dataclass(frozen=True)
class Number(Kind):
    min: float  # exclusive
    max: float

    def parse(self, raw: Any) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"expected a number, got {_show(raw)}")
        if not (math.isfinite(raw) and self.min < raw <= self.max):
            raise ValueError(f"{raw} is out of range: use more than {self.min:g}, up to {self.max:g}")
        return float(raw)

    def schema(self) -> dict[str, Any]:
        return {"type": "number", "exclusiveMinimum": self.min, "maximum": self.max}


@dataclass(frozen=True)
class Percent(Kind):
    """A share of one CPU: "2%", or a fraction like 0.02."""

    max: float  # as a fraction

    def parse(self, raw: Any) -> float:
        value: Any = raw
        if isinstance(raw, str) and raw.strip().endswith("%"):
            with contextlib.suppress(ValueError):
                value = float(raw.strip()[:-1]) / 100
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a percentage like 2% (or a fraction like 0.02), got {_show(raw)}")
        if not (math.isfinite(value) and 0 < value <= self.max):
            raise ValueError(f"{raw} is out of range: use more than 0%, up to {self.max * 100:g}%")
        return float(value)

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": self.max},
                          {"type": "string", "pattern": r"^[0-9.]+%$"}]}


@dataclass(frozen=True)
class Schedule(Kind):
    """keep_alive_schedule: a list of windows (config/schedule.py)."""

    def parse(self, raw: Any) -> tuple[schedule.Window, ...]:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError("expected a list of windows like 'mon-fri 08:00-18:00'")
        if len(items) > 64:
            raise ValueError("more than 64 windows")
        return tuple(schedule.parse_window(v) for v in items)

    def schema(self) -> dict[str, Any]:
        one = {"type": "string", "pattern": r"^\s*(\S+\s+)?[0-9]{2}:[0-9]{2}-[0-9]{2}:[0-9]{2}\s*$"}
        return {"oneOf": [one, {"type": "array", "items": one, "maxItems": 64}]}


@dataclass(frozen=True)
class Protocols(Kind):
    """protocol: tcp, udp, or both as a list ([tcp, udp], as a DNS server listens)."""

    def parse(self, raw: Any) -> tuple[str, ...]:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items or not all(v in ("tcp", "udp") for v in items):
            raise ValueError(f"expected tcp, udp or [tcp, udp], got {_show(raw)}")
        return tuple(p for p in ("tcp", "udp") if p in items)

    def schema(self) -> dict[str, Any]:
        one = {"type": "string", "enum": ["tcp", "udp"]}
        return {"oneOf": [one, {"type": "array", "items": one, "minItems": 1, "uniqueItems": True}]}


@dataclass(frozen=True)
class Text(Kind):
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    hint: str = ""

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {_show(raw)}" + (f" ({self.hint})" if self.hint else ""))
        if self.choices and raw not in self.choices:
            raise ValueError(f"'{raw}' is not one of: {', '.join(self.choices)}")
        if self.pattern and not re.fullmatch(self.pattern, raw):
            raise ValueError(f"'{raw}' is not valid" + (f" ({self.hint})" if self.hint else ""))
        if not raw:
            raise ValueError("must not be empty")
        return raw

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string", "minLength": 1}
        if self.choices:
            s["enum"] = list(self.choices)
        if self.pattern:
            s["pattern"] = self.pattern
        return s


@dataclass(frozen=True)
class AbsPath(Kind):
    def parse(self, raw: Any) -> Path:
        if not isinstance(raw, str) or not raw.startswith("/"):
            raise ValueError(f"expected an absolute path, got {_show(raw)}")
        return Path(raw)

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": "^/"}


@dataclass(frozen=True)
class Args(Kind):
    """A command: a string (one argument) or a list of strings and numbers."""

    def parse(self, raw: Any) -> tuple[str, ...]:
        if isinstance(raw, str):
            return (raw,)
        if not isinstance(raw, list) or not all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                                for v in raw):
            raise ValueError("expected a string or a list of strings")
        if len(raw) > 4096:
            raise ValueError("more than 4096 arguments")
        return tuple(str(v) for v in raw)

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": ["string", "number"]}}]}


_ENV_NAME = r"[A-Za-z_][A-Za-z0-9_]*"


def _env_value(v: Any) -> str:
    """A YAML scalar as the app sees it: true/false as written in YAML 1.2 (Python would say True), null as ''.
    (The loader reads unquoted yes/no/on/off as booleans too: quote them to keep the word.)"""
    if isinstance(v, bool):
        return "true" if v else "false"
    return "" if v is None else str(v)


@dataclass(frozen=True)
class Environment(Kind):
    def parse(self, raw: Any) -> tuple[tuple[str, str], ...]:
        pairs: list[tuple[str, str]] = []
        if isinstance(raw, Mapping):
            for k, v in raw.items():
                if isinstance(v, Mapping | list):
                    raise ValueError(f"'{k}': expected a plain value, got {_show(v)}")
                pairs.append((str(k), _env_value(v)))
        elif isinstance(raw, list):
            for item in raw:
                if not isinstance(item, str):
                    raise ValueError(f"expected KEY=VALUE strings, got {_show(item)}")
                key, sep, val = item.partition("=")
                if not sep:
                    raise ValueError(f"'{item}' is not KEY=VALUE")
                pairs.append((key, val))
        else:
            raise ValueError("expected a mapping or a list of KEY=VALUE")
        for key, value in pairs:
            if not re.fullmatch(_ENV_NAME, key):
                raise ValueError(f"'{key}' is not a valid environment variable name")
            if "\0" in value:
                raise ValueError(f"'{key}': a value cannot contain a NUL byte")
        return tuple(pairs)

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "object", "propertyNames": {"pattern": f"^{_ENV_NAME}$"}},
                          {"type": "array", "items": {"type": "string", "pattern": f"^{_ENV_NAME}="}}]}


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

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "string"}, {"type": "integer"}, {"type": "null"}, {"const": False}]}


@dataclass(frozen=True)
class Flag(Kind):
    def parse(self, raw: Any) -> bool:
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {_show(raw)}")
        return raw

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class AutoFlag(Kind):
    """true, false, or auto (decided from the rest of the file)."""

    def parse(self, raw: Any) -> bool | str:
        if isinstance(raw, bool) or raw == "auto":
            return raw  # type: ignore[no-any-return]
        raise ValueError(f"expected true, false or auto, got {_show(raw)}")

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "boolean"}, {"const": "auto"}]}


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

    def schema(self) -> dict[str, Any]:
        return {"type": "object", "propertyNames": {"pattern": r"^[A-Za-z0-9.-]{1,253}$"},
                "additionalProperties": {"type": "string"}}


#: every capability Linux 6.x knows (capabilities(7)), as Docker spells them without the CAP_ prefix
CAPABILITIES = (
    "CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
    "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
    "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
    "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
    "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
    "CHECKPOINT_RESTORE",
)


@dataclass(frozen=True)
class Capabilities(Kind):
    """A list of capability names (NET_RAW or CAP_NET_RAW, any case); ALL where all_ok."""

    all_ok: bool = False

    def parse(self, raw: Any) -> tuple[str, ...]:
        if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
            raise ValueError(f"expected a list of capability names like [NET_RAW], got {_show(raw)}")
        out = []
        for v in raw:
            name = v.upper().removeprefix("CAP_")
            if name == "ALL" and self.all_ok:
                return ("ALL",)
            if name not in CAPABILITIES:
                raise ValueError(f"'{v[:40]}' is not a capability (e.g. NET_RAW, NET_ADMIN, SYS_PTRACE"
                                 + (", or ALL" if self.all_ok else "") + ")")
            out.append(name)
        return tuple(sorted(set(out)))

    def schema(self) -> dict[str, Any]:
        names = [*CAPABILITIES, *(("ALL",) if self.all_ok else ())]
        return {"type": "array", "items": {"type": "string", "enum": names + [f"CAP_{n}" for n in names]}}


@dataclass(frozen=True)
class Volume:
    """source: an absolute host path (bound as is), a volume name (state_dir/volumes/NAME), or with external a
    Docker volume's name (its data used as it is, as Compose's `external: true`)."""

    source: str
    target: str
    read_only: bool = False
    external: bool = False
    #: Podman's `U`: the host directory given (chowned, recursively) to the user the app runs as
    chown: bool = False
    #: Podman's `idmap`: bound through an idmapped mount, so host owners are kept and the app sees them as its own
    idmap: bool = False

    @property
    def named(self) -> bool:
        return not self.source.startswith("/") and not self.external

    def plain(self) -> dict[str, Any]:
        """For the checkpoint fingerprint: the options added later only when set, so a volume written before
        they existed keeps its fingerprint (and its checkpoint)."""
        out = asdict(self)
        for name in ("chown", "idmap"):
            if not out[name]:
                del out[name]
        return out


_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: the short form's options, as Docker and Podman write them (`/srv/data:/data:ro,U`)
VOLUME_OPTIONS = ("ro", "rw", "U", "idmap")
_VOLUME_KEYS = ("source", "target", "read_only", "external", "chown", "idmap")
#: where a volume may not go: what the container's own mounts are made of
_NOT_A_TARGET = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class Volumes(Kind):
    """`SOURCE:TARGET[:ro|rw]` strings (as docker run -v and Compose), or {source, target, read_only}."""

    def parse(self, raw: Any) -> tuple[Volume, ...]:
        if not isinstance(raw, list):
            raise ValueError(f"expected a list of SOURCE:TARGET[:ro], got {_show(raw)}")
        out: list[Volume] = []
        for item in raw:
            if isinstance(item, str):
                parts = item.split(":")
                opts = parts[2].split(",") if len(parts) == 3 else []
                if len(parts) not in (2, 3) or any(o not in VOLUME_OPTIONS for o in opts) \
                        or len(set(opts)) != len(opts) or {"ro", "rw"} <= set(opts):
                    raise ValueError(f"'{item[:80]}' is not SOURCE:TARGET[:OPTIONS] (OPTIONS: comma-separated, one "
                                     "of ro or rw, and U or idmap for a host path)")
                v = Volume(parts[0], parts[1], "ro" in opts, chown="U" in opts, idmap="idmap" in opts)
            elif isinstance(item, Mapping) and set(item) <= set(_VOLUME_KEYS):
                if not isinstance(item.get("source"), str) or not isinstance(item.get("target"), str) \
                        or not all(isinstance(item.get(k, False), bool) for k in _VOLUME_KEYS[2:]):
                    raise ValueError("a volume needs source and target strings (and read_only, external, chown, "
                                     "idmap: true/false)")
                v = Volume(item["source"], item["target"], item.get("read_only", False), item.get("external", False),
                           item.get("chown", False), item.get("idmap", False))
            else:
                raise ValueError(f"expected SOURCE:TARGET[:ro] or {{source, target, read_only}}, got {_show(item)}")
            if (v.chown or v.idmap) and not v.source.startswith("/"):
                raise ValueError(f"'{v.source[:80]}': U (chown) and idmap apply to host paths only (a named volume "
                                 "is already owned by the service's user namespace range)")
            if v.chown and v.idmap:
                raise ValueError(f"'{v.source[:80]}': U (chown) and idmap together: pick one (idmap keeps the "
                                 "host's owners, U changes them)")
            target = os.path.normpath(v.target)
            if not v.target.startswith("/") or target == "/" or any(
                    target == p or target.startswith(p + "/") for p in _NOT_A_TARGET):
                raise ValueError(f"'{v.target[:80]}': the target must be an absolute path other than /, /proc, "
                                 "/sys and /dev")
            if v.named and not _VOLUME_NAME.fullmatch(v.source):
                raise ValueError(f"'{v.source[:80]}' is neither an absolute host path nor a volume name "
                                 "(letters, digits, '_', '.', '-')")
            if v.external and not _VOLUME_NAME.fullmatch(v.source):
                raise ValueError(f"'{v.source[:80]}' is not a Docker volume name (external: true)")
            if not v.named and ("\0" in v.source or os.path.normpath(v.source) == "/"):
                raise ValueError(f"'{v.source[:80]}': not a host path to bind")
            if any(o.target == target for o in out):
                raise ValueError(f"two volumes on {target}")
            out.append(Volume(v.source if v.named or v.external else os.path.normpath(v.source), target,
                              v.read_only, v.external, v.chown, v.idmap))
        return tuple(out)

    def schema(self) -> dict[str, Any]:
        return {"type": "array", "items": {"oneOf": [
            {"type": "string", "pattern": r"^[^:]+:/[^:]*(:(ro|rw|U|idmap)(,(ro|rw|U|idmap))*)?$"},
            {"type": "object", "required": ["source", "target"], "additionalProperties": False,
             "properties": {"source": {"type": "string"}, "target": {"type": "string"},
                            "read_only": {"type": "boolean"}, "external": {"type": "boolean"},
                            "chown": {"type": "boolean"}, "idmap": {"type": "boolean"}}}]}}


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

    def schema(self) -> dict[str, Any]:
        one = {"type": "object", "additionalProperties": False, "required": ["from"],
               "properties": {"http": {"type": "string", "pattern": "^/"}, "tcp": {"type": "boolean"},
                              "from": {"type": "array", "items": {"type": "string"}, "minItems": 1}}}
        return {"type": "array", "items": one, "maxItems": 32}


def probe_paths(probes: tuple[Probe, ...]) -> list[str]:
    """What of the probes shapes the checkpoint: the paths whose answers it records (not who asks)."""
    return sorted({p.http for p in probes if p.http is not None})


@dataclass(frozen=True)
class TmpfsMount:
    target: str
    options: tuple[str, ...]  # mount options, Docker's defaults (rw,noexec,nosuid,nodev) included


#: what `docker run --tmpfs` and Compose accept after the path, besides size= and mode=
_TMPFS_FLAGS = frozenset({"ro", "rw", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime",
                          "relatime", "strictatime", "nodiratime"})


@dataclass(frozen=True)
class Tmpfs(Kind):
    """`PATH[:OPTIONS]` (as docker run --tmpfs and Compose): an empty tmpfs on PATH, rw,noexec,nosuid,nodev unless
    the options say otherwise; size=N[k|m|g], mode=OCTAL, uid=N, gid=N."""

    def parse(self, raw: Any) -> tuple[TmpfsMount, ...]:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"expected a list of PATH[:OPTIONS], got {_show(raw)}")
        out: list[TmpfsMount] = []
        for item in items:
            target, _, opts = item.partition(":")
            target = os.path.normpath(target) if target.startswith("/") else target
            if not target.startswith("/") or target == "/" or any(
                    target == p or target.startswith(p + "/") for p in _NOT_A_TARGET):
                raise ValueError(f"'{item[:80]}': the path must be absolute, other than /, /proc, /sys and /dev")
            options = ["rw", "noexec", "nosuid", "nodev"]
            for o in filter(None, opts.split(",")):
                name, eq, value = o.partition("=")
                if (not eq and name not in _TMPFS_FLAGS) or (eq and name not in ("size", "mode", "uid", "gid")):
                    raise ValueError(f"'{item[:80]}': unknown tmpfs option '{o[:40]}' (size=, mode=, uid=, gid=, "
                                     "ro, exec, suid, dev, ...)")
                if name == "size":
                    value = str(parse_size(value.lower().removesuffix("b") if value[-1:] in "bB" else value))
                elif name == "mode" and not re.fullmatch(r"[0-7]{3,4}", value):
                    raise ValueError(f"'{item[:80]}': mode must be octal, like 1777")
                elif name in ("uid", "gid") and not value.isdigit():
                    raise ValueError(f"'{item[:80]}': {name} must be a number")
                opposite = {"ro": "rw", "rw": "ro", "exec": "noexec", "noexec": "exec", "suid": "nosuid",
                            "nosuid": "suid", "dev": "nodev", "nodev": "dev"}.get(name)
                options = [x for x in options if x != opposite and x.partition("=")[0] != name]
                options.append(f"{name}={value}" if eq else name)
            if any(t.target == target for t in out):
                raise ValueError(f"two tmpfs mounts on {target}")
            out.append(TmpfsMount(target, tuple(options)))
        return tuple(out)

    def schema(self) -> dict[str, Any]:
        one = {"type": "string", "pattern": "^/"}
        return {"oneOf": [one, {"type": "array", "items": one}]}


#: Docker's ulimit names -> the kernel's resource
ULIMITS = {"as": "RLIMIT_AS", "core": "RLIMIT_CORE", "cpu": "RLIMIT_CPU", "data": "RLIMIT_DATA",
           "fsize": "RLIMIT_FSIZE", "locks": "RLIMIT_LOCKS", "memlock": "RLIMIT_MEMLOCK",
           "msgqueue": "RLIMIT_MSGQUEUE", "nice": "RLIMIT_NICE", "nofile": "RLIMIT_NOFILE", "nproc": "RLIMIT_NPROC",
           "rss": "RLIMIT_RSS", "rtprio": "RLIMIT_RTPRIO", "rttime": "RLIMIT_RTTIME",
           "sigpending": "RLIMIT_SIGPENDING", "stack": "RLIMIT_STACK"}


@dataclass(frozen=True)
class Ulimits(Kind):
    """{name: N} or {name: {soft: N, hard: N}} (Docker's names: nofile, nproc, core, memlock, ...)."""

    def parse(self, raw: Any) -> tuple[tuple[str, int, int], ...]:
        if not isinstance(raw, Mapping):
            raise ValueError(f"expected a mapping like {{nofile: {{soft: 1024, hard: 4096}}}}, got {_show(raw)}")
        out = []
        for name, value in raw.items():
            if name not in ULIMITS:
                raise ValueError(f"'{str(name)[:40]}' is not a ulimit ({', '.join(ULIMITS)})")
            if isinstance(value, Mapping) and set(value) == {"soft", "hard"}:
                soft, hard = value["soft"], value["hard"]
            else:
                soft = hard = value
            for v in (soft, hard):
                if isinstance(v, bool) or not isinstance(v, int) or not -1 <= v < 2**63:
                    raise ValueError(f"{name}: expected a whole number (-1: unlimited) or {{soft, hard}}, got "
                                     f"{_show(value)}")
            soft, hard = (2**64 - 1 if v == -1 else v for v in (soft, hard))
            if soft > hard:
                raise ValueError(f"{name}: soft ({soft}) is above hard ({hard})")
            out.append((str(name), soft, hard))
        return tuple(sorted(out))

    def schema(self) -> dict[str, Any]:
        n = {"type": "integer", "minimum": -1}
        return {"type": "object", "propertyNames": {"enum": list(ULIMITS)}, "additionalProperties": {"oneOf": [
            n, {"type": "object", "required": ["soft", "hard"], "additionalProperties": False,
                "properties": {"soft": n, "hard": n}}]}}


_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?")


def _is_hostname(name: str) -> bool:
    # Label by label: one regex over the whole name with nested repetition backtracks exponentially.
    return 0 < len(name) <= 253 and all(_LABEL.fullmatch(label) for label in name.split("."))


@dataclass(frozen=True)
class Section(Kind):
    """A nested mapping, parsed into its own dataclass."""

    cls: type

    def schema(self) -> dict[str, Any]:
        return object_schema(self.cls)


def key(kind: Kind, default: Any = MISSING, *, doc: str, nullable: bool = False, shapes: bool = False,
        factory: Any = MISSING) -> Any:
    """Declare a config key: how it is parsed, its default, what it means, and whether it shapes the
    checkpointed process (changing such a key rebuilds the checkpoint)."""
    meta = {"kind": kind, "doc": doc, "nullable": nullable, "shapes": shapes}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


# --- the model ---------------------------------------------------------------------------------------------


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
class Readiness:
    """When a freshly started template counts as ready to be checkpointed."""

    timeout: float = key(Duration(0.1, HOUR), 60.0, doc="how long the template may take to listen on its port")
    http_path: str | None = key(
        Text(pattern=r"/[\x21-\x7e]*", hint="an absolute URL path like /health"), None, nullable=True, shapes=True,
        doc="also wait for GET on this path to answer 2xx/3xx before the dump (null: listening is enough)")
    command: tuple[str, ...] | None = key(
        Args(), None, nullable=True, shapes=True,
        doc="also run this in the template (as its app's user, in its sandbox) until it exits 0, like a Compose "
            "healthcheck's CMD; a string runs as `/bin/sh -c STRING` (CMD-SHELL)")
    command_timeout: float = key(Duration(0.1, HOUR), 30.0, doc="longest one run of command may take")


@dataclass(frozen=True)
class Warmup:
    """Requests sent to the template before it is dumped, so instances start with the app's caches filled and
    its hot code compiled (a JVM's JIT): what the first requests after a restore would otherwise pay for."""

    http_paths: tuple[str, ...] = key(Args(), (), shapes=True,
                                      doc="GET each of these paths (HTTP/1.1, Connection: close)")
    payload: str | None = key(Text(), None, nullable=True, shapes=True,
                              doc="or send this (raw TCP) on a connection and read the first reply")
    count: int = key(Int(1, 100_000), 100, shapes=True, doc="how many times, per path")

    def __post_init__(self) -> None:
        for p in self.http_paths:
            if not p.startswith("/"):
                raise ValueError(f"warmup.http_paths: '{p}' must start with '/'")


HTTP_METHODS = ("GET", "POST", "PUT", "DELETE")


@dataclass(frozen=True)
class PreStop:
    """An HTTP request the activator makes to an instance's app before it asks it to stop (idle reaping,
    scale-in, `activator stop`, a reload or the daemon's shutdown), so the app can flush, deregister or finish
    work: what Kubernetes' preStop httpGet and Docker's lifecycle hooks are for. The stop signal follows when it
    answers, fails, or times out."""

    http_path: str | None = key(
        Text(pattern=r"/[\x21-\x7e]*", hint="an absolute URL path like /admin/flush"), None, nullable=True,
        doc="the request's path, sent to the app's port on the instance's own loopback (null: no request)")
    method: str = key(Text(choices=HTTP_METHODS), "POST", doc="the request's method")
    timeout: float = key(Duration(0.1, 10 * MINUTE), 10.0,
                         doc="longest the request may take; the stop goes on after it either way")


#: a CFS quota of 1 ms per 100 ms period (spec.CPU_PERIOD_US), the least the kernel accepts
MIN_CPUS = 0.01


@dataclass(frozen=True)
class Resources:
    memory: int | None = key(Size(4 * MiB, 2**40), None, nullable=True, doc="memory limit per instance")
    cpus: float | None = key(Number(0, 1024), None, nullable=True, doc="CPU limit per instance")
    pids: int | None = key(Int(8, 4_194_304), None, nullable=True,
                           doc="process/thread limit per instance (at least 8: runc and the app need a few)")

    def __post_init__(self) -> None:
        # The kernel's smallest CFS quota is 1 ms (of a 100 ms period): less is EINVAL at every restore.
        if self.cpus is not None and self.cpus < MIN_CPUS:
            raise ValueError(f"cpus: {self.cpus:g} is below the kernel's smallest CPU quota; use at least {MIN_CPUS}")


@dataclass(frozen=True)
class Backoff:
    """How long a service waits after failed starts before trying again: initial, doubling up to max."""

    initial: float = key(Duration(0.01, DAY), 1.0, doc="wait after the first failure")
    max: float = key(Duration(0.01, DAY), 60.0, doc="longest wait, however many failures in a row")

    def __post_init__(self) -> None:
        if self.max < self.initial:
            raise ValueError(f"backoff.max ({_human_duration(self.max)}) must be at least backoff.initial "
                             f"({_human_duration(self.initial)})")

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1 = the first)."""
        return float(min(self.max, self.initial * 2 ** min(64, max(0, failures - 1))))


@dataclass(frozen=True)
class NetworkSettings:
    """The host side of instance networking: one bridge and one subnet, owned by this activator."""

    bridge: str = key(Text(pattern=r"[a-zA-Z][a-zA-Z0-9_-]{0,14}", hint="an interface name, at most 15 characters"),
                      "activator0", doc="the bridge instances are attached to (created and owned by activator)")
    subnet: ipaddress.IPv4Network = key(
        Subnet(), ipaddress.IPv4Network("10.89.0.0/24"),
        doc="instance addresses; the first one is the bridge's (the instances' gateway). Must not overlap any "
            "address or route of the host (Docker's default bridge is 172.17.0.0/16)")


IMAGE_ENGINES = ("docker", "podman")
#: where each engine's Docker-compatible API listens when settings.images.socket is null (docker: DOCKER_HOST first)
DEFAULT_ENGINE_SOCKETS = {"docker": Path("/var/run/docker.sock"), "podman": Path("/run/podman/podman.sock")}


@dataclass(frozen=True)
class ImageSettings:
    """Where images come from: an engine's Docker-compatible API, spoken by the Docker SDK. Nothing runs under
    the engine; it resolves names and hands over image configs and root filesystems."""

    engine: str = key(Text(choices=IMAGE_ENGINES), "docker",
                      doc="docker, or podman (its Docker-compatible API: `systemctl enable --now podman.socket`)")
    socket: Path | None = key(AbsPath(), None, nullable=True,
                              doc="the engine's API socket (null: DOCKER_HOST or /var/run/docker.sock for docker, "
                                  "/run/podman/podman.sock for podman)")

    @property
    def name(self) -> str:
        return "Podman" if self.engine == "podman" else "Docker"


@dataclass(frozen=True)
class RegistrySettings:
    """Where checkpoint images are shared between hosts (docs/multi-host.md): a daemon without a current
    checkpoint pulls one before it builds, and pushes what it builds, so a fleet builds each checkpoint once."""

    repository: str = key(
        Text(pattern=r"[a-z0-9]([a-z0-9.-]*[a-z0-9])?(:\d{1,5})?(/[a-z0-9]+([._-][a-z0-9]+)*)+",
             hint="REGISTRY[:PORT]/PATH, like registry.example:5000/activator"),
        doc="images go to REPOSITORY/SERVICE:TAG (the tag names what the checkpoint was built from)")
    tls_verify: bool = key(Flag(), True, doc="verify the registry's TLS certificate (false only for a plain-HTTP "
                                             "registry on a network you own)")
    auth_file: Path | None = key(AbsPath(), None, nullable=True,
                                 doc="credentials, as `skopeo login --authfile` or `docker login` write them")
    pull: bool = key(Flag(), True, doc="pull a checkpoint before building one")
    push: bool = key(Flag(), True, doc="push every checkpoint built here")
    timeout: float = key(Duration(1, HOUR), 300.0, doc="longest one push or pull may take")


@dataclass(frozen=True)
class AbsPaths(Kind):
    """One absolute path or a list of them."""

    def parse(self, raw: Any) -> tuple[Path, ...]:
        items = raw if isinstance(raw, list) else [raw]
        return tuple(AbsPath().parse(i) for i in items)

    def schema(self) -> dict[str, Any]:
        one = AbsPath().schema()
        return {"oneOf": [one, {"type": "array", "items": one}]}


@dataclass(frozen=True)
class TrustSettings:
    """Who may make the checkpoints this host restores from elsewhere (an archive file or the registry): images are
    signed with Ed25519 over their manifest digest (checkpoints/signing.py) and verified before anything of them
    is unpacked. Only a builder host (or CI) holds a signing key; hosts that only pull hold none."""

    keys: tuple[Path, ...] = key(AbsPaths(), (), doc="public keys (PEM, from `activator checkpoint keygen`) whose "
                                                    "signatures this host accepts on imported or pulled checkpoints")
    sign_key: Path | None = key(AbsPath(), None, nullable=True,
                                doc="private key (0600) that signs what this host exports or pushes (null: none)")
    insecure_unsigned: bool = key(Flag(), False, doc="LAB ONLY: accept unsigned checkpoint images (an archive from "
                                                     "anyone then runs as its author wishes in an instance)")


@dataclass(frozen=True)
class AgentSettings:
    """An endpoint for L4 balancers (HAProxy's agent-check): per service, its state here and how warm it is."""

    listen: ListenAddress = key(Address(), doc="HOST:PORT the agent answers on (HAProxy's agent-port)")
    drain_notice: float = key(
        Duration(0, HOUR), 2.0,
        doc="on SIGTERM, answer `drain` this long while still serving, so balancers stop sending before the "
            "listeners close (at least the balancer's agent-inter)")


FALLBACKS = ("cold-start", "none")
NETWORKS = ("bridge", "none")
PROXY_PROTOCOLS = ("v1", "v2")
WAKE_ON = ("data", "connect")
REFUSALS = ("close", "http-503")
USERNS = ("private", "host")
#: capabilities over the network namespace, which a user namespace of the instance does not own
NETWORK_CAPS = frozenset({"NET_RAW", "NET_ADMIN"})
#: `seccomp:` values that are not paths
SECCOMP_DEFAULT, SECCOMP_UNCONFINED = "default", "unconfined"


@dataclass(frozen=True)
class ServiceConfig:
    name: str  # the key under `services:`, not a key of its own
    image: str = key(Text(hint="an image reference like app:1.2"), shapes=True,
                     doc="a local Docker image (the image source; nothing runs under Docker)")
    listen: tuple[ListenAddress, ...] = key(Listen(), doc="HOST:PORT to accept clients on, or a list of them")
    port: int = key(Int(1, 65535), shapes=True, doc="the port the app listens on inside its container")
    protocol: tuple[str, ...] = key(
        Protocols(), ("tcp",), shapes=True,
        doc="tcp, udp, or [tcp, udp] (a DNS server): for udp the activator listens for datagrams on the same "
            "addresses; the first one from a client wakes the service, and it and those that follow are held "
            "(udp_queue) and delivered in order")
    udp_flow_timeout: float = key(
        Duration(1, HOUR), 30.0,
        doc="a UDP flow (one client address and port) with no datagram either way for this long is over: its "
            "instance may go idle, and its next datagram is a new flow (on the kernel path: its conntrack timeout)")
    udp_queue: int = key(Int(1, 100_000), 64,
                         doc="datagrams held per UDP flow while its instance starts; past it they are dropped and "
                             "counted (activator_udp_dropped_total)")
    udp_held_bytes: int = key(
        Size(MiB, 2**34), 4 * MiB,
        doc="bytes of datagrams held for the whole service (all its flows) while an instance starts; past it they "
            "are dropped and counted (activator_udp_dropped_total)")
    udp_reply_ratio: float = key(
        Number(0, 1_000_000), 3.0,
        doc="bytes the app may send a UDP client per byte that client sent (RFC 9000's anti-amplification "
            "rule), so a datagram with a forged source cannot aim the app's answers at a victim; replies past it "
            "are dropped and counted (activator_udp_replies_dropped_total). Raise it for protocols whose answers "
            "are much larger than their requests")
    command: tuple[str, ...] | None = key(Args(), None, nullable=True, shapes=True,
                                          doc="overrides the image's Cmd (like compose)")
    entrypoint: tuple[str, ...] | None = key(Args(), None, nullable=True, shapes=True,
                                             doc="overrides the image's Entrypoint (like compose)")
    environment: tuple[tuple[str, str], ...] = key(Environment(), (), shapes=True,
                                                    doc="variables added to the image's environment")
    working_dir: str | None = key(Text(pattern=r"/.*", hint="an absolute path"), None, nullable=True, shapes=True,
                                  doc="overrides the image's WorkingDir")
    user: str | None = key(Text(pattern=r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?", hint="USER or USER:GROUP"), None,
                           nullable=True, shapes=True, doc="overrides the image's User")
    seccomp: str = key(
        Text(pattern=r"default|unconfined|/.+", hint="default, unconfined or an absolute path to a profile"),
        SECCOMP_DEFAULT, shapes=True,
        doc="syscall filter: default (Docker's default profile), unconfined, or a Docker-format profile file")
    network: str = key(Text(choices=NETWORKS), "bridge", shapes=True,
                       doc="bridge: an address on activator's bridge, outbound access, and connections steered to "
                           "instances in the kernel; none: loopback only, every byte through the activator")
    egress: bool = key(Flag(), True, doc="with network: bridge, whether the app may open connections out")
    userns: str = key(Text(choices=USERNS), "private", shapes=True,
                      doc="private: the app runs in a user namespace of its own (root in it is an unprivileged "
                          "uid on the host, its range kept in state_dir/userns.json); host: no user namespace, "
                          "root in the instance is root on the host (only for an app that needs what a user "
                          "namespace cannot give it, such as a host device)")
    cap_add: tuple[str, ...] = key(Capabilities(), (), shapes=True,
                                   doc="capabilities added to the default set (Docker's, less NET_RAW), e.g. "
                                       "[NET_RAW] for an app that sends raw packets")
    cap_drop: tuple[str, ...] = key(Capabilities(all_ok=True), (), shapes=True,
                                    doc="capabilities taken from the default set, or [ALL]")
    extra_hosts: tuple[tuple[str, str], ...] = key(Hosts(), (), shapes=True,
                                                    doc="extra /etc/hosts entries for the app, {name: address}")
    hostname: str | None = key(Text(pattern=r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62})", hint="a host name"), None,
                               nullable=True, shapes=True, doc="the app's host name (null: the service's name)")
    read_only: bool = key(Flag(), False, shapes=True,
                          doc="mount the image's root filesystem read-only (give the app tmpfs or volumes to write)")
    tmpfs: tuple[TmpfsMount, ...] = key(
        Tmpfs(), (), shapes=True,
        doc="PATH[:OPTIONS]: an empty tmpfs per instance (rw,noexec,nosuid,nodev; size=, mode=, exec, ...); what "
            "the app wrote there before the checkpoint is in every instance's")
    ulimits: tuple[tuple[str, int, int], ...] = key(
        Ulimits(), (), shapes=True, doc="resource limits of the app's processes, {nofile: {soft: N, hard: N}, ...}")
    depends_on: tuple[str, ...] = key(
        Args(), (), shapes=True,
        doc="services of this file this one uses: woken with it, kept while an instance of this one lives, and "
            "reachable from it by name (their listen port, through the gateway address)")
    volumes: tuple[Volume, ...] = key(
        Volumes(), (), shapes=True,
        doc="SOURCE:TARGET[:OPTIONS]: a host path, or a volume name kept in state_dir/volumes (filled from the "
            "image on first use, like Docker's), bound into the template and every instance; its data outlives them. "
            "OPTIONS (comma-separated): ro or rw; for a host path, U (long form chown: true: the directory is "
            "chowned to the app's user as the instance sees it) or idmap (an idmapped bind: host owners kept, the "
            "app sees them as its own); docs/volumes.md")
    share_memory: bool | str = key(
        AutoFlag(), "auto",
        doc="let the kernel merge identical pages of this service's instances (KSM): much less memory per extra "
            "instance, at some CPU; a side channel between everything merged, so auto means: only when this is "
            "the file's only service")
    stateful: bool | str = key(
        AutoFlag(), "auto",
        doc="the app keeps what is in its volumes in memory (a database): one instance at a time, and its "
            "checkpoint made again (from the volumes as that instance left them) before the next one; auto: when "
            "its app held a file of a writable volume open for writing when it was checkpointed")
    readiness: Readiness = key(Section(Readiness), factory=Readiness, doc="when the template is ready to dump")
    warmup: Warmup = key(Section(Warmup), factory=Warmup, doc="requests run against the template before the dump")
    idle_timeout: float = key(Duration(0.01, 30 * DAY), 300.0,
                              doc="an instance with no open connection for this long is killed")
    idle_cpu_below: float | None = key(
        Percent(64.0), None, nullable=True,
        doc="an instance is idle only if its processes also used less than this share of one CPU over the "
            "idle window (2%, or 0.02): an app still working on its own (a batch job, a long request's tail "
            "after its client left) is not killed; it is looked at again an idle_timeout later (null: connections "
            "alone decide)")
    probes: tuple[Probe, ...] = key(
        Probes(), (), shapes=True,
        doc="health checks the activator answers itself, without waking the service or keeping an instance alive: "
            "[{http: /healthz, from: [10.0.0.0/8]}] answers a GET or HEAD of /healthz from those addresses with what "
            "the template answered at build time while nothing runs (and asks a running instance itself while one "
            "does); [{tcp: true, from: [...]}] lets a connection from those addresses that sends nothing be a "
            "check, never a wake. Anything else from those addresses is served as usual")
    pre_stop: PreStop = key(Section(PreStop), factory=PreStop,
                            doc="an HTTP request made to an instance before it is asked to stop")
    keep_alive_schedule: tuple[schedule.Window, ...] = key(
        Schedule(), (),
        doc="hours the service is kept warm, in the host's time zone: during each window one instance is "
            "started ahead of any client and none is reaped below one (as min_instances: 1); outside, idle_timeout "
            "applies. Windows are '[DAYS] HH:MM-HH:MM', e.g. ['mon-fri 08:00-18:00', 'sat 10:00-12:00']")
    restore_timeout: float = key(Duration(0.01, HOUR), 10.0, doc="longest a restore may take (CRIU's restore)")
    connect_timeout: float = key(Duration(0.01, HOUR), 5.0,
                                 doc="from restored to accepting connections; past it the instance is removed")
    resources: Resources = key(Section(Resources), factory=Resources, doc="limits per instance")
    min_instances: int = key(Int(0, 256), 0, doc="instances kept running even when idle")
    prepared_slots: int = key(Int(0, 16), 1,
                              doc="instances prepared ahead but for their process (namespace, network, mounts): a "
                                  "restore then is one request to a CRIU already waiting in it (~1 MB each)")
    standby: int = key(Int(0, 16), 0,
                       doc="instances restored ahead and kept frozen (no CPU, their timers stopped): the first "
                           "connection that needs a new instance thaws one in well under a millisecond instead of "
                           "waiting for a restore, and a new standby is restored behind it. Each costs the memory "
                           "of an instance (shared between them and the running ones with share_memory)")
    max_instances: int = key(Int(1, 256), 1, doc="most instances restored from the one checkpoint at once")
    target_connections: int = key(Int(1, 1_000_000), 100,
                                  doc="open connections per instance before another one is restored")
    max_connections: int | None = key(
        Int(1, 10_000_000), None, nullable=True,
        doc="open connections for the whole service; past it, closed at once (null: as many as the daemon's "
            "file descriptor limit allows)")
    max_waiting: int = key(Int(0, 1_000_000), 1000,
                           doc="connections waiting for an instance; past it, closed at once")
    backoff: Backoff = key(Section(Backoff), factory=Backoff, doc="after failed starts, no new attempt before this")
    fallback: str = key(Text(choices=FALLBACKS), "cold-start",
                        doc="after a failed restore: cold-start (boot from the image) or none")
    refuse_with: str | None = key(
        Text(choices=REFUSALS), None, nullable=True,
        doc="how a refused client (no checkpoint, backing off, stopped, over a limit) is told: the connection "
            "closed, or http-503: an HTTP 503 answer with Retry-After first (null: http-503 for an http: true "
            "service, else close)")
    http: bool = key(Flag(), False,
                     doc="the service speaks HTTP/1.x: refused clients get a 503 with Retry-After (unless refuse_with "
                         "says close), and waiting_page may answer browsers during a slow start")
    waiting_page: float | None = key(
        Duration(0, 10 * MINUTE), None, nullable=True,
        doc="with http: true, a browser's page load (a GET that accepts text/html) still waiting for an instance "
            "after this long gets a small 'starting' page that reloads itself (503, Retry-After: 1) while the "
            "start goes on; other clients keep waiting (null: every client waits)")
    proxy_protocol: str | None = key(Text(choices=PROXY_PROTOCOLS), None, nullable=True,
                                     doc="send a PROXY protocol header (v1 or v2) to the app before client bytes")
    handoff: bool = key(
        Flag(), False,
        doc="the app accepts straight from the activator's listening socket, handed into each restored instance "
            "in place of the one it listened on at dump time (a patched CRIU): warm connections reach the app as "
            "a direct connection would, with no NAT, bridge or copy, and the kernel spreads them over the "
            "instances. The activator sees only the connections that wake the service, so it needs exactly one "
            "listen address and takes no proxy_protocol, max_connections or client_idle_timeout")
    wake_on: str = key(Text(choices=WAKE_ON), "data",
                       doc="what wakes a service with no instance: a connection's first byte, or after wake_grace "
                           "of silence (data), or the connection itself (connect)")
    wake_grace: float | None = key(
        Duration(0, HOUR), 0.5, nullable=True,
        doc="with wake_on: data, a connection silent this long wakes the service anyway (server-speaks-first "
            "protocols); null: only data wakes it")
    client_idle_timeout: float | None = key(
        Duration(0.1, 30 * DAY), None, nullable=True,
        doc="a connection with no bytes either way for this long is closed (null: never); on the kernel path, "
            "its conntrack idle timeout")
    client_silent_timeout: float | None = key(
        Duration(0.1, 30 * DAY), 60.0, nullable=True,
        doc="a connection whose client has not sent one byte this long after it was accepted is closed, so "
            "connections that never speak cannot pin instances; quiet sessions that have exchanged data are not "
            "affected (null: never; through the activator only: the kernel path does not see the bytes)")
    stop_signal: str | None = key(
        Text(pattern=r"(SIG)?[A-Z0-9+-]+|[0-9]+", hint="a signal name like SIGTERM, or a number"), None,
        nullable=True, doc="what an instance is asked to stop with when it is reaped or drained (null: the "
                           "image's STOPSIGNAL, else SIGTERM)")
    stop_grace: float = key(Duration(0, 5 * 60), 10.0,
                            doc="how long a stopping instance's app may take to exit before it is killed; an app "
                                "that does not handle the stop signal is killed at once")

    def __post_init__(self) -> None:
        if not _NAME_RE.fullmatch(self.name):
            raise ValueError("service names are 1-40 of a-z, 0-9, '_' and '-', starting with a letter or digit")
        if self.stop_signal is not None:
            signal_number(self.stop_signal)  # raises ValueError naming the problem
        for dep in self.depends_on:
            if dep == self.name:
                raise ValueError(f"depends_on: '{dep}' is this service itself")
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) must not exceed max_instances "
                             f"({self.max_instances})")
        if self.standby > self.max_instances:
            raise ValueError(f"standby ({self.standby}) must not exceed max_instances ({self.max_instances}): a "
                             "standby is thawed into one of them")
        if self.stateful is True and self.standby:
            raise ValueError("stateful: true makes the checkpoint again after each instance, so no instance can be "
                             "restored ahead; set standby: 0")
        if self.stateful is True and self.max_instances > 1:
            raise ValueError(f"stateful: true runs one instance at a time; max_instances ({self.max_instances}) "
                             "must be 1")
        if "udp" in self.protocol:
            self._check_udp()
        if self.waiting_page is not None and not self.http:
            raise ValueError("waiting_page answers HTTP requests; set http: true (the service speaks HTTP/1.x) or "
                             "remove waiting_page")
        if self.handoff:
            self._check_handoff()
        netcaps = sorted(set(self.cap_add) & NETWORK_CAPS)
        if netcaps and self.userns == "private":
            raise ValueError(f"cap_add: {', '.join(netcaps)} gives nothing in the instance's user namespace (its "
                             "network namespace is made outside it, so no capability over the network is held); "
                             "set 'userns: host' for an app that needs it")

    def _check_udp(self) -> None:
        if not self.listen:
            raise ValueError("protocol: udp needs listen addresses: the activator binds its UDP sockets itself "
                             "(systemd's datagram sockets are not taken over)")
        if self.handoff:
            raise ValueError("handoff: true hands over a TCP listening socket; use it without udp in protocol")
        if self.proxy_protocol is not None:
            raise ValueError("proxy_protocol: the PROXY header is written into TCP streams only; remove it or use "
                             "protocol: tcp")

    @property
    def refusal(self) -> str:
        """How refused clients are told (refuse_with, its default decided by http)."""
        return self.refuse_with or ("http-503" if self.http else "close")

    def _check_handoff(self) -> None:
        if len(self.listen) > 1:
            raise ValueError("handoff: true hands one listening socket to the app; give the service one listen "
                             f"address (it has {len(self.listen)})")
        if self.standby:
            raise ValueError("handoff: true: a standby's app would accept from the service's socket between its "
                             "restore and its freeze; set standby: 0 or handoff: false")
        if self.probes:
            raise ValueError("handoff: true: the apps accept every connection themselves, so the activator cannot "
                             "answer probes; remove probes or set handoff: false")
        if self.pre_stop.http_path is not None:
            raise ValueError("handoff: true: a reaped instance is killed while frozen, so that it takes no connection "
                             "from the service's socket, and cannot be asked anything first; remove pre_stop or set "
                             "handoff: false")
        unseen = [k for k, v in (("proxy_protocol", self.proxy_protocol), ("max_connections", self.max_connections),
                                 ("client_idle_timeout", self.client_idle_timeout)) if v is not None]
        if unseen:
            raise ValueError(f"handoff: true: the app accepts its connections itself, so the activator cannot apply "
                             f"{unseen[0]}; remove it or set handoff: false")

    def checkpoint_fingerprint(self) -> str:
        """Hash of everything that shapes the checkpointed process (keys declared with shapes=True)."""
        return hashlib.sha256(json.dumps(_shaping(self), sort_keys=True).encode()).hexdigest()[:16]


def signal_number(name: str) -> int:
    """SIGTERM, TERM, 15 -> 15 (what Docker accepts for STOPSIGNAL)."""
    if name.isdigit():
        n = int(name)
        if n in set(signal.Signals):
            return n
    else:
        with contextlib.suppress(KeyError):
            return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    raise ValueError(f"'{name}' is not a signal (stop_signal: SIGTERM, SIGINT, SIGQUIT, ... or a number)")


#: process-shaping keys added after checkpoints were made without them
# userns: Origin.userns (the range itself) decides
ADDED_LATER = frozenset({"volumes", "cap_add", "cap_drop", "hostname", "read_only", "tmpfs", "ulimits", "depends_on",
                         "readiness.command", "userns", "probes", "protocol"})


def _plain(value: Any) -> Any:
    """JSON-able: dataclasses as dicts, tuples of them as lists."""
    if isinstance(value, Volume):
        return value.plain()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _shaping(obj: Any, at: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("shapes"):
            if at + f.name in ADDED_LATER and value == f.default:
                continue  # absent from fingerprints made before the key existed: those stay current
            out[f.name] = probe_paths(value) if f.name == "probes" else _plain(value)
        elif is_dataclass(value) and (inner := _shaping(value, f"{at}{f.name}.")):
            out[f.name] = inner
    return out


@dataclass(frozen=True)
class Settings:
    state_dir: Path = key(AbsPath(), Path("/var/lib/activator"),
                          doc="checkpoints, unpacked images, instances and logs (root only)")
    metrics: ListenAddress | None = key(Address(), ListenAddress("127.0.0.1", 9464), nullable=True,
                                        doc="Prometheus scrape endpoint HOST:PORT (null: off)")
    drain_timeout: float = key(Duration(0, HOUR), 10.0,
                               doc="on SIGTERM, how long open connections may finish before they are cut")
    runc: str = key(Text(), "runc", doc="the runc binary (a name on PATH or a path), built with CRIU support")
    criu: str = key(Text(), "criu", doc="the CRIU binary (a name on PATH or a path) runc and activator run")
    images: ImageSettings = key(Section(ImageSettings), factory=ImageSettings,
                                doc="the engine services' images come from (docker, or podman)")
    network: NetworkSettings = key(Section(NetworkSettings), factory=NetworkSettings,
                                   doc="the bridge and subnet instances with network: bridge live on")
    checkpoint_registry: RegistrySettings | None = key(
        Section(RegistrySettings), None, nullable=True,
        doc="share checkpoints through an OCI registry (null: every host builds its own)")
    agent: AgentSettings | None = key(Section(AgentSettings), None, nullable=True,
                                      doc="answer L4 balancers' agent checks (null: off)")
    checkpoint_trust: TrustSettings = key(Section(TrustSettings), factory=TrustSettings,
                                          doc="signing keys for checkpoint images that travel between hosts")

    def __post_init__(self) -> None:
        reg, trust = self.checkpoint_registry, self.checkpoint_trust
        if reg is not None and reg.pull and not trust.keys and not trust.insecure_unsigned:
            raise ValueError("checkpoint_registry.pull: pulled checkpoints must be signed, and "
                             "checkpoint_trust.keys names no key to check them with; add the builder's public key "
                             "(`activator checkpoint keygen PATH` on the builder), or set pull: false")
        if reg is not None and reg.push and trust.sign_key is None and not trust.insecure_unsigned:
            raise ValueError("checkpoint_registry.push: pushed checkpoints are signed, and checkpoint_trust.sign_key "
                             "is not set; name this builder's private key, or set push: false on hosts that only "
                             "pull")


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


# --- parsing ------------------------------------------------------------------------------------------------


def build(cls: type, raw: Any, where: str, loc: str, **fixed: Any) -> Any:
    """One mapping -> one dataclass, every key parsed by the kind its field declares. Every key's problem is
    said (ConfigErrors, a line each), not only the first; what relates keys (__post_init__) is checked once each
    key is valid."""
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: {loc or 'top level'}: expected a mapping, got {_show(raw)}")
    data = dict(raw)
    kwargs: dict[str, Any] = dict(fixed)
    declared = [f for f in fields(cls) if "kind" in f.metadata]
    problems: list[ConfigError] = []

    def error(k: str, problem: str) -> ConfigError:
        return ConfigError(f"{where}: {loc + '.' if loc else ''}{k}: {problem}")

    for f in declared:
        if f.name not in data:
            if f.default is MISSING and f.default_factory is MISSING:
                problems.append(error(f.name, "is required"))
            continue
        value = data.pop(f.name)
        kind: Kind = f.metadata["kind"]
        if value is None and f.metadata["nullable"]:
            kwargs[f.name] = None
        elif value is None and f.default is MISSING and f.default_factory is MISSING:
            problems.append(error(f.name, "is required"))
        elif isinstance(kind, Section):
            try:
                kwargs[f.name] = build(kind.cls, value, where, f"{loc}.{f.name}" if loc else f.name)
            except ConfigError as e:
                problems.append(e)
        else:
            try:
                kwargs[f.name] = kind.parse(value)
            except (ValueError, TypeError, OverflowError) as e:
                problems.append(error(f.name, str(e)))
    for k in data:
        problems.append(error(str(k)[:60], unknown_key(str(k), [f.name for f in declared])))
    if problems:
        raise combined(problems)
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(f"{where}: {loc or 'top level'}: {e}") from None


def _refuse_unmarked_compose(raw: Mapping[str, Any], where: str) -> None:
    """A Compose file whose services have no x-activator block: say so, not 'ports: unknown key'."""
    services = raw.get("services")
    if not isinstance(services, Mapping):
        return
    for name, body in services.items():
        if not isinstance(body, Mapping) or "listen" in body or "port" in body:  # activator's own keys: not Compose
            continue
        if found := sorted(set(map(str, body)) & compose.COMPOSE_SERVICE_ONLY):
            raise ConfigError(f"{where}: services.{str(name)[:60]}.{found[0]}: this looks like a Compose service, "
                              f"but it has no '{compose.MARK}' block; add `{compose.MARK}: {{}}` to each service "
                              "activator should serve")


#: past this many valid keys, the message names the close one and where the rest are listed, not all of them
_LISTED_KEYS = 12


def unknown_key(key: str, valid: list[str]) -> str:
    """'unknown key', the closest valid one if there is one, and the valid ones (or, for a service's many keys,
    where they are listed)."""
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    guess = f"did you mean '{close[0]}'? " if close else ""
    if len(valid) > _LISTED_KEYS:
        return f"unknown key; {guess}the valid keys are in docs/configuration.md (or `activator schema`)"
    return f"unknown key; {guess}valid keys are: {', '.join(valid)}"


def parse_config(text: str, path: Path) -> Config:
    """The file's configuration, or every problem it has (ConfigErrors: a line each) where one does not stop the
    rest from being read: each key of each service, settings, and what relates services."""
    where = str(path)
    try:
        raw = yamlload.load(text)
    except yamlload.LoadError as e:
        raise ConfigError(f"{where}: {e}") from None
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: top level: expected a mapping with 'services:', got {_show(raw)}")
    origins: dict[str, list[str]] = {}
    notes: tuple[str, ...] = ()
    if compose.is_compose(raw):
        raw = dict(compose.translate(raw, path))
        origins = raw.pop(compose.ORIGINS)
        notes = tuple(raw.pop(compose.NOTES))
    problems: list[ConfigError] = []
    for k in raw:
        if k not in ("settings", "services"):
            if k in compose.COMPOSE_TOP_LEVEL:
                raise ConfigError(f"{where}: {str(k)[:60]}: this looks like a Compose file, but no service has an "
                                  f"'{compose.MARK}' block; add `{compose.MARK}: {{}}` to each service activator "
                                  "should serve")
            problems.append(ConfigError(f"{where}: {str(k)[:60]}: {unknown_key(str(k), ['settings', 'services'])}"))
    if not origins:
        _refuse_unmarked_compose(raw, where)
    settings: Settings | None = None
    try:
        settings = build(Settings, raw.get("settings"), where, "settings")
    except ConfigError as e:
        problems.append(e)
    services_raw = raw.get("services")
    if services_raw is None:
        raise combined([*problems, ConfigError(f"{where}: services: is required (a mapping of service names to "
                                               "definitions)")])
    if not isinstance(services_raw, Mapping):
        raise combined([*problems, ConfigError(f"{where}: services: expected a mapping of service names to "
                                               "definitions")])
    # `services: {}` is valid: a daemon with nothing to serve yet (the installed starter file), filled by a reload.
    services = []
    failed: set[str] = set()
    for name, body in services_raw.items():
        if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
            problems.append(ConfigError(f"{where}: services.{str(name)[:60]}: service names are 1-40 of a-z, 0-9, "
                                        "'_' and '-', starting with a letter or digit"))
            continue
        try:
            services.append(build(ServiceConfig, body, where, f"services.{name}", name=name))
        except ConfigError as e:
            failed.add(name)
            problems += [_where_written(line, where, name, origins) for line in e.lines]
            continue
        notes += _bare_ports(name, body)
    gateway = next((settings or Settings()).network.subnet.hosts())
    problems += _check_listeners(services, settings, where)
    problems += _check_dependencies(services, failed, str(gateway), where)
    if problems:
        raise combined(problems)
    assert settings is not None
    return Config(path=path, settings=settings, services=tuple(services), notes=notes)


def _where_written(line: str, where: str, name: str, origins: Mapping[str, list[str]]) -> ConfigError:
    """A key from a Compose service's x-activator block: said where it really is."""
    prefix = f"{where}: services.{name}."
    key = line.removeprefix(prefix).split(":", 1)[0].split(".", 1)[0]
    if line.startswith(prefix) and key in origins.get(name, ()):
        return ConfigError(prefix + f"{compose.MARK}." + line.removeprefix(prefix))
    return ConfigError(line)


_BARE_PORT = re.compile(r"\s*:?(\d{1,5})\s*")


def _bare_ports(name: str, body: Any) -> tuple[str, ...]:
    """A listen address without a host binds every interface of the host: said, since a user who writes 8080
    may mean this host only (a database published to the world by a typo)."""
    listen = body.get("listen") if isinstance(body, Mapping) else None
    out = []
    for item in listen if isinstance(listen, list) else [listen]:
        if isinstance(item, bool) or not isinstance(item, int | str):
            continue
        if m := _BARE_PORT.fullmatch(str(item)):
            port = m.group(1)
            out.append(f"services.{name}.listen: warning: '{item}' names no host, so it listens on every interface "
                       f"of this host (0.0.0.0:{port}), as Docker's `-p {port}:...` publishes on all interfaces; "
                       f"write 0.0.0.0:{port} to say so, or 127.0.0.1:{port} for this host only")
    return tuple(out)


def _covers(a: ListenAddress, b: ListenAddress) -> bool:
    """Does a socket bound to a hold b's address too (the same, or a wildcard over it)? [::] is dual-stack
    (activator does not set IPV6_V6ONLY), so it holds IPv4 addresses as well."""
    if a.port != b.port:
        return False
    if a.host == b.host:
        return True
    wild, other = ipaddress.ip_address(a.host), ipaddress.ip_address(b.host)
    return wild.is_unspecified and (wild.version == other.version or wild.version == 6)


def _check_listeners(services: list[ServiceConfig], settings: Settings | None, where: str) -> list[ConfigError]:
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


def _check_dependencies(services: list[ServiceConfig], failed: set[str], gateway: str, where: str
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


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        with open(p, "rb") as f:
            data = f.read(yamlload.MAX_BYTES + 1)
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file; pass the services file with -c FILE") from None
    except IsADirectoryError:
        raise ConfigError(f"{p}: is a directory; pass the services file with -c FILE") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{p}: not UTF-8 text (byte {e.start}); save the file as UTF-8") from None
    return parse_config(text, p.resolve())


# --- JSON Schema, derived from the same declarations --------------------------------------------------------


def object_schema(cls: type) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = []
    for f in fields(cls):
        if "kind" not in f.metadata:
            continue
        s = dict(f.metadata["kind"].schema())
        if f.metadata["nullable"]:
            s = {"oneOf": [s, {"type": "null"}]}
        s["description"] = f.metadata["doc"]
        if f.default is not MISSING and f.default is not None:
            d = f.default
            s["default"] = (str(d) if isinstance(d, Path | ListenAddress | ipaddress.IPv4Network)
                            else list(d) if isinstance(d, tuple) else d)
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(f.name)
        props[f.name] = s
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        out["description"] = cls.__doc__.strip().splitlines()[0]
    return out


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
