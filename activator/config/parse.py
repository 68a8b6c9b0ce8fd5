"""Parsing a services file: the YAML (native or Compose, translated) walked into the declared dataclasses, every
problem of the file collected and said on a line of its own (ConfigErrors), each naming the file, the service and
the key.

Reads the file it is given and nothing else.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import MISSING, fields
from pathlib import Path
from typing import Any

from activator.errors import ConfigError, combined

from . import compose, yamlload
from .declare import Section
from .document import Config, check_dependencies, check_listeners
from .kinds import Kind
from .service import NAME_RE, ServiceConfig
from .settings import Settings
from .units import show as _show


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
        if not isinstance(name, str) or not NAME_RE.fullmatch(name):
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
    problems += check_listeners(services, settings, where)
    problems += check_dependencies(services, failed, str(gateway), where)
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
