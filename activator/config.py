"""Configuration: YAML in, frozen and validated objects out.

A file looks like this (compose-like, so Docker users read it at a glance)::

    settings:                         # optional
      state_dir: /var/lib/activator
      metrics: 127.0.0.1:9464         # or null to disable
      drain_timeout: 10s
    services:
      tomcat:
        image: activator-demo/tomcat:latest
        listen: 127.0.0.1:8080        # or a list of addresses
        port: 8080                    # where the app listens inside its container
        command: [catalina.sh, run]   # optional, like compose: overrides the image's Cmd
        entrypoint: null              # optional, overrides the image's Entrypoint
        environment: {JAVA_OPTS: -Xmx256m}
        working_dir: /
        user: "0:0"
        readiness: {http_path: /, timeout: 60s}
        idle_timeout: 5m
        resources: {memory: 512m, cpus: 1.5, pids: 512}
        # capacity: instances restored from the one checkpoint
        min_instances: 0              # kept warm even when idle
        max_instances: 4
        target_connections: 50        # open connections per instance before another one is restored
        # admission control
        max_connections: 1000         # open connections for the whole service; past it, closed at once
        max_waiting: 500              # connections waiting for an instance; past it, closed at once
        restore_timeout: 10s          # runc restore
        connect_timeout: 5s           # from restored to accepting connections
        backoff: {initial: 1s, max: 1m}   # after failed starts, no new attempt before this
        fallback: cold-start          # or none: after a failed restore, boot from the image instead
        proxy_protocol: v2            # or v1, or null: PROXY header toward the app

Invalid, each with a one-line error naming the file, the service and the key::

    services: {web: {image: x, listen: 8080, port: 80, colour: red}}   # unknown key 'colour'
    services: {web: {image: x, listen: "localhost:99999", port: 80}}  # port out of range
    services: {web: {image: x, listen: ":80", port: 80, idle_timeout: soon}}  # not a duration

Durations are seconds (number) or strings with a unit: 250ms, 5s, 2m, 1h. Sizes are bytes or strings with
k/m/g (binary). Nothing here touches the network, Docker or the filesystem beyond reading the file.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,39}$")
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h)?\s*$")
_SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)b?\s*$", re.IGNORECASE)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, None: 1.0}


@dataclass(frozen=True)
class ListenAddress:
    host: str
    port: int

    def __post_init__(self) -> None:
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 0-65535")

    @classmethod
    def parse(cls, text: str | int) -> ListenAddress:
        """'host:port', '[v6]:port', ':port' or a bare port (binds 0.0.0.0)."""
        s = str(text).strip()
        if s.isdigit():
            return cls("0.0.0.0", int(s))
        m = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]*):(\d+)", s)
        if not m:
            raise ValueError(f"'{s}' is not HOST:PORT (e.g. 127.0.0.1:8080, [::1]:8080, :8080)")
        host = m.group(1) or m.group(3) or "0.0.0.0"
        return cls(host, int(m.group(2) or m.group(4)))

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class Readiness:
    """When a freshly started template counts as ready to be checkpointed."""

    timeout: float = 60.0
    #: None: ready as soon as the app listens on its port (no connection is made).
    http_path: str | None = None

    def __post_init__(self) -> None:
        if self.timeout <= 0:
            raise ValueError("timeout must be positive")
        if self.http_path is not None and not self.http_path.startswith("/"):
            raise ValueError(f"http_path '{self.http_path}' must start with '/'")


@dataclass(frozen=True)
class Resources:
    memory: int | None = None  # bytes
    cpus: float | None = None
    pids: int | None = None

    def __post_init__(self) -> None:
        if self.memory is not None and self.memory < 4 * 1024**2:
            raise ValueError("memory must be at least 4m")
        if self.cpus is not None and self.cpus <= 0:
            raise ValueError("cpus must be positive")
        if self.pids is not None and self.pids < 1:
            raise ValueError("pids must be at least 1")


@dataclass(frozen=True)
class Backoff:
    """How long a service waits after failed starts before trying again: initial, doubling up to max."""

    initial: float = 1.0
    max: float = 60.0

    def __post_init__(self) -> None:
        if self.initial <= 0 or self.max < self.initial:
            raise ValueError("backoff needs 0 < initial <= max")

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1 = the first)."""
        return float(min(self.max, self.initial * 2 ** max(0, failures - 1)))


FALLBACKS = ("cold-start", "none")
PROXY_PROTOCOLS = ("v1", "v2")


@dataclass(frozen=True)
class ServiceConfig:
    name: str
    image: str
    listen: tuple[ListenAddress, ...]
    port: int
    command: tuple[str, ...] | None = None
    entrypoint: tuple[str, ...] | None = None
    environment: tuple[tuple[str, str], ...] = ()
    working_dir: str | None = None
    user: str | None = None
    readiness: Readiness = field(default_factory=Readiness)
    idle_timeout: float = 300.0
    restore_timeout: float = 10.0
    resources: Resources = field(default_factory=Resources)
    min_instances: int = 0
    max_instances: int = 1
    target_connections: int = 100
    max_connections: int | None = None
    max_waiting: int = 1000
    connect_timeout: float = 5.0
    backoff: Backoff = field(default_factory=Backoff)
    fallback: str = "cold-start"
    proxy_protocol: str | None = None

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError("service names are 1-40 of a-z, 0-9, '_' and '-', starting with a letter or digit")
        if not self.image:
            raise ValueError("image must not be empty")
        if not self.listen:
            raise ValueError("listen needs at least one address")
        if not 1 <= self.port <= 65535:
            raise ValueError(f"port {self.port} is out of range 1-65535")
        if self.idle_timeout <= 0 or self.restore_timeout <= 0 or self.connect_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.max_instances < 1:
            raise ValueError("max_instances must be at least 1")
        if not 0 <= self.min_instances <= self.max_instances:
            raise ValueError(f"min_instances must be between 0 and max_instances ({self.max_instances})")
        if self.target_connections < 1:
            raise ValueError("target_connections must be at least 1")
        if self.max_connections is not None and self.max_connections < 1:
            raise ValueError("max_connections must be at least 1 (or null for no limit)")
        if self.max_waiting < 0:
            raise ValueError("max_waiting must not be negative")
        if self.fallback not in FALLBACKS:
            raise ValueError(f"fallback '{self.fallback}' is not one of: {', '.join(FALLBACKS)}")
        if self.proxy_protocol is not None and self.proxy_protocol not in PROXY_PROTOCOLS:
            raise ValueError(f"proxy_protocol '{self.proxy_protocol}' is not one of: v1, v2, null")
        if self.working_dir is not None and not self.working_dir.startswith("/"):
            raise ValueError(f"working_dir '{self.working_dir}' must be absolute")

    def checkpoint_fingerprint(self) -> str:
        """Hash of everything that shapes the checkpointed process; addresses, limits and timeouts do not."""
        d = asdict(self)
        shaping = {k: d[k] for k in ("image", "port", "command", "entrypoint", "environment", "working_dir", "user")}
        shaping["readiness"] = {"http_path": self.readiness.http_path}
        return hashlib.sha256(json.dumps(shaping, sort_keys=True).encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Settings:
    state_dir: Path = Path("/var/lib/activator")
    metrics: ListenAddress | None = ListenAddress("127.0.0.1", 9464)
    drain_timeout: float = 10.0
    #: the runc binary (a name on PATH or a path); it must be built with CRIU support
    runc: str = "runc"

    @property
    def control_socket(self) -> Path:
        """Where `activator status` finds the running daemon (root only: it lives in state_dir, mode 0600)."""
        return self.state_dir / "control.sock"

    def __post_init__(self) -> None:
        if self.drain_timeout < 0:
            raise ValueError("drain_timeout must not be negative")
        if not self.state_dir.is_absolute():
            raise ValueError(f"state_dir '{self.state_dir}' must be absolute")


@dataclass(frozen=True)
class Config:
    path: Path
    settings: Settings
    services: tuple[ServiceConfig, ...]

    def service(self, name: str) -> ServiceConfig:
        for s in self.services:
            if s.name == name:
                return s
        known = ", ".join(s.name for s in self.services)
        raise ConfigError(f"{self.path}: no service named '{name}' (known: {known})")


# --- parsing ------------------------------------------------------------------------------------------------


def parse_duration(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("expected a duration like 500ms, 5s, 2m")
    if isinstance(value, int | float):
        return float(value)
    m = _DURATION_RE.match(str(value))
    if not m:
        raise ValueError(f"'{value}' is not a duration (e.g. 500ms, 5s, 2m, 1h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def parse_size(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError("expected a size like 512m")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(str(value))
    if not m:
        raise ValueError(f"'{value}' is not a size (e.g. 256m, 1g, 1048576)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]


class _Section:
    """Reads keys out of one mapping; whatever is left over at the end is an unknown key."""

    def __init__(self, data: Any, where: str, loc: str, allowed: tuple[str, ...]) -> None:
        self.where, self.loc, self.allowed = where, loc, allowed
        if data is None:
            data = {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: {loc or 'top level'}: expected a mapping, got {type(data).__name__}")
        self.data = dict(data)

    def error(self, key: str, problem: str) -> ConfigError:
        dotted = f"{self.loc}.{key}" if self.loc else key
        return ConfigError(f"{self.where}: {dotted}: {problem}")

    def take(self, key: str, convert: Any = None, default: Any = None) -> Any:
        if key not in self.data:
            return default
        raw = self.data.pop(key)
        if convert is None or raw is None:
            return raw
        try:
            return convert(raw)
        except (ValueError, TypeError) as e:
            raise self.error(key, str(e)) from None

    def require(self, key: str, convert: Any = None) -> Any:
        if key not in self.data or self.data[key] is None:
            raise self.error(key, "is required")
        return self.take(key, convert)

    def finish(self) -> None:
        for key in self.data:
            raise self.error(str(key), f"unknown key; valid keys are: {', '.join(self.allowed)}")


def _str_list(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, list) or not all(isinstance(v, str | int | float) for v in value):
        raise ValueError("expected a string or a list of strings")
    return tuple(str(v) for v in value)


def _environment(value: Any) -> tuple[tuple[str, str], ...]:
    pairs: list[tuple[str, str]] = []
    if isinstance(value, Mapping):
        pairs = [(str(k), "" if v is None else str(v)) for k, v in value.items()]
    elif isinstance(value, list):
        for item in value:
            key, sep, val = str(item).partition("=")
            if not sep:
                raise ValueError(f"'{item}' is not KEY=VALUE")
            pairs.append((key, val))
    else:
        raise ValueError("expected a mapping or a list of KEY=VALUE")
    for key, _ in pairs:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", key):
            raise ValueError(f"'{key}' is not a valid environment variable name")
    return tuple(pairs)


def _listen(value: Any) -> tuple[ListenAddress, ...]:
    items = value if isinstance(value, list) else [value]
    return tuple(ListenAddress.parse(v) for v in items)


def _int(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"expected an integer, got {value!r}")
    return value


def _float(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"expected a number, got {value!r}")
    return float(value)


_SERVICE_KEYS = (
    "image", "listen", "port", "command", "entrypoint", "environment", "working_dir", "user",
    "readiness", "idle_timeout", "restore_timeout", "resources", "min_instances", "max_instances",
    "target_connections", "max_connections", "max_waiting", "connect_timeout", "backoff", "fallback",
    "proxy_protocol",
)


def _service(name: Any, data: Any, where: str) -> ServiceConfig:
    loc = f"services.{name}"
    sec = _Section(data, where, loc, _SERVICE_KEYS)
    ready = _Section(sec.take("readiness"), where, f"{loc}.readiness", ("timeout", "http_path"))
    res = _Section(sec.take("resources"), where, f"{loc}.resources", ("memory", "cpus", "pids"))
    bo = _Section(sec.take("backoff"), where, f"{loc}.backoff", ("initial", "max"))
    try:
        readiness = Readiness(
            timeout=ready.take("timeout", parse_duration, 60.0), http_path=ready.take("http_path", str)
        )
        ready.finish()
        resources = Resources(
            memory=res.take("memory", parse_size), cpus=res.take("cpus", _float), pids=res.take("pids", _int)
        )
        res.finish()
        backoff = Backoff(initial=bo.take("initial", parse_duration, 1.0), max=bo.take("max", parse_duration, 60.0))
        bo.finish()
        svc = ServiceConfig(
            name=str(name),
            image=sec.require("image", str),
            listen=sec.require("listen", _listen),
            port=sec.require("port", _int),
            command=sec.take("command", _str_list),
            entrypoint=sec.take("entrypoint", _str_list),
            environment=sec.take("environment", _environment, ()),
            working_dir=sec.take("working_dir", str),
            user=sec.take("user", str),
            readiness=readiness,
            idle_timeout=sec.take("idle_timeout", parse_duration, 300.0),
            restore_timeout=sec.take("restore_timeout", parse_duration, 10.0),
            resources=resources,
            min_instances=sec.take("min_instances", _int, 0),
            max_instances=sec.take("max_instances", _int, 1),
            target_connections=sec.take("target_connections", _int, 100),
            max_connections=sec.take("max_connections", _int),
            max_waiting=sec.take("max_waiting", _int, 1000),
            connect_timeout=sec.take("connect_timeout", parse_duration, 5.0),
            backoff=backoff,
            fallback=sec.take("fallback", str, "cold-start"),
            proxy_protocol=sec.take("proxy_protocol", str),
        )
    except ValueError as e:
        raise ConfigError(f"{where}: {loc}: {e}") from None
    sec.finish()
    return svc


def parse_config(text: str, path: Path) -> Config:
    where = str(path)
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"{where}: malformed YAML{at}: {problem}") from None
    top = _Section(raw, where, "", ("settings", "services"))
    st = _Section(top.take("settings"), where, "settings", ("state_dir", "metrics", "drain_timeout", "runc"))
    try:
        metrics_raw = st.data.get("metrics", "127.0.0.1:9464")
        settings = Settings(
            state_dir=Path(st.take("state_dir", str, "/var/lib/activator")),
            metrics=None if metrics_raw in (None, False, "off") else ListenAddress.parse(metrics_raw),
            drain_timeout=st.take("drain_timeout", parse_duration, 10.0),
            runc=st.take("runc", str, "runc"),
        )
        st.data.pop("metrics", None)
    except ValueError as e:
        raise ConfigError(f"{where}: settings: {e}") from None
    st.finish()
    services_raw = top.take("services")
    top.finish()
    if services_raw is None:
        raise ConfigError(f"{where}: services: is required (a mapping of service names to definitions)")
    if not isinstance(services_raw, Mapping) or not services_raw:
        raise ConfigError(f"{where}: services: expected a mapping of service names to definitions")
    services = tuple(_service(name, body, where) for name, body in services_raw.items())
    _check_unique_listeners(services, where)
    return Config(path=path, settings=settings, services=services)


def _check_unique_listeners(services: tuple[ServiceConfig, ...], where: str) -> None:
    seen: dict[tuple[str, int], str] = {}
    for svc in services:
        for addr in svc.listen:
            key = (addr.host, addr.port)
            if key in seen and addr.port != 0:
                raise ConfigError(
                    f"{where}: services.{svc.name}.listen: {addr} is already used by service '{seen[key]}'"
                )
            seen[key] = svc.name


def load_config(path: str | Path) -> Config:
    p = Path(path)
    try:
        text = p.read_text()
    except FileNotFoundError:
        raise ConfigError(f"{p}: no such file; pass the services file with -c FILE") from None
    except OSError as e:
        raise ConfigError(f"{p}: cannot read: {e.strerror}") from None
    return parse_config(text, p.resolve())
