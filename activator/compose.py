"""Services taken from a docker-compose.yml: `activator run -c docker-compose.yml`.

A Compose file is recognised by its `x-activator` blocks. Each Compose service that has one (even `{}`) is
served by activator; the others (a database that runs under `docker compose` as usual) are left alone. A
top-level `x-activator: {settings: ...}` holds activator's settings.

From a Compose service: image, command, entrypoint, environment, env_file, user, working_dir, cap_add, cap_drop,
volumes, and ports (one published TCP port: `[HOST_IP:]PUBLISHED:TARGET` or the long form) -> listen/port. Keys
in the service's `x-activator` block are activator's own (idle_timeout, max_instances, ...) and win over what is
derived.
`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `$VAR` and `$$` are
interpolated as Compose does, from the environment and the `.env` file next to the Compose file.

volumes: a host path (relative to the Compose file's directory) or a named volume (kept in state_dir/volumes;
Compose's own named volumes are not shared with it). Compose keys that would silently change what the app gets
if ignored (privileged, devices, network_mode, a build without an image, anonymous volumes) are refused
in one line; the rest (restart, depends_on, networks,
healthcheck, labels, ...) concern `docker compose` and are ignored.

Pure, apart from reading the .env and env_file files next to the Compose file.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError

MARK = "x-activator"
#: in translate()'s document: which keys of each service came from its x-activator block (for error paths)
ORIGINS = "x-activator keys"
#: keys only a Compose service has: a services file with them and no x-activator is a Compose file
COMPOSE_SERVICE_ONLY = frozenset({"ports", "build", "restart", "depends_on", "networks", "container_name",
                                  "expose", "healthcheck", "deploy", "env_file", "labels"})
#: top-level keys of the Compose specification: a file with them and no x-activator block is a Compose file
COMPOSE_TOP_LEVEL = frozenset({"version", "name", "include", "networks", "volumes", "configs", "secrets"})
REFUSED = {
    "privileged": "activator runs instances with Docker's default sandbox only",
    "devices": "activator gives instances Docker's default devices only",
    "network_mode": "instances get activator's own network (network: bridge or none in x-activator)",
}
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")


def is_compose(raw: Mapping[str, Any]) -> bool:
    services = raw.get("services")
    return MARK in raw or (isinstance(services, Mapping)
                           and any(isinstance(s, Mapping) and MARK in s for s in services.values()))


def translate(raw: Mapping[str, Any], path: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The activator services document for a Compose document (and, under ORIGINS, which keys came from each
    service's x-activator block). Raises ConfigError (one line)."""
    where = str(path)
    env = dict(_dotenv(path.parent / ".env", where))
    env.update(os.environ if environ is None else environ)
    raw = _interpolate(raw, env, where, "")
    top = raw.get(MARK) or {}
    if not isinstance(top, Mapping) or set(top) - {"settings"}:
        raise ConfigError(f"{where}: {MARK}: expected a mapping with only 'settings:' (service keys go in each "
                          f"service's own {MARK} block)")
    if not isinstance(raw.get("services"), Mapping):
        raise ConfigError(f"{where}: services: expected a mapping of Compose services")
    services: dict[str, Any] = {}
    origins: dict[str, list[str]] = {}
    for name, body in raw["services"].items():
        if isinstance(body, Mapping) and MARK in body:
            services[name] = _service(str(name), body, path, where)
            if isinstance(body[MARK], Mapping):
                origins[str(name)] = [str(k) for k in body[MARK]]
    if not services:
        raise ConfigError(f"{where}: no Compose service has an '{MARK}' block; add `{MARK}: {{}}` to each service "
                          "activator should serve")
    doc: dict[str, Any] = {"services": services, ORIGINS: origins}
    if top.get("settings") is not None:
        doc["settings"] = top["settings"]
    return doc


def _service(name: str, body: Mapping[str, Any], path: Path, where: str) -> dict[str, Any]:
    at = f"{where}: services.{name}"
    own = body[MARK] if body[MARK] is not None else {}
    if not isinstance(own, Mapping):
        raise ConfigError(f"{at}.{MARK}: expected a mapping of activator's service keys")
    for key, why in REFUSED.items():
        if body.get(key):
            raise ConfigError(f"{at}.{key}: {why}; remove it or leave this service to docker compose")
    if "image" not in body and "image" not in own:
        raise ConfigError(f"{at}: no image (activator does not build): build it and name it with 'image:'")
    out: dict[str, Any] = {}
    if "image" in body:
        out["image"] = body["image"]
    for key in ("command", "entrypoint"):
        if isinstance(body.get(key), str):
            try:
                out[key] = shlex.split(body[key])  # what Compose does with a string
            except ValueError as e:
                raise ConfigError(f"{at}.{key}: {e}") from None
        elif body.get(key) is not None:
            out[key] = body[key]
    for key in ("user", "working_dir"):
        if body.get(key) is not None:
            out[key] = str(body[key])
    for key in ("cap_add", "cap_drop"):  # the same names and meaning as activator's keys
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("volumes"):
        out["volumes"] = _volumes(body["volumes"], path.parent, at)
    environment = _env_files(body.get("env_file"), path.parent, at)
    environment.update(_environment(body.get("environment"), at))
    if environment:
        out["environment"] = environment
    if "listen" not in own or "port" not in own:
        out.update(_ports(body.get("ports"), own.get("port"), at))
    out.update(own)
    return out


def _volumes(raw: Any, base: Path, at: str) -> list[Any]:
    """Compose volumes -> activator's: relative and ~ host paths resolved against the Compose file's directory,
    named volumes kept by name (in state_dir/volumes), tmpfs refused."""
    if not isinstance(raw, list):
        raise ConfigError(f"{at}.volumes: expected a list")
    out: list[Any] = []
    for v in raw:
        if isinstance(v, Mapping):
            if v.get("type", "volume") not in ("volume", "bind"):
                raise ConfigError(f"{at}.volumes: type {v.get('type')} is not supported (bind or volume)")
            source, target, ro = v.get("source"), v.get("target"), bool(v.get("read_only", False))
            if not isinstance(source, str) or not isinstance(target, str):
                raise ConfigError(f"{at}.volumes: a volume needs source and target (anonymous volumes would "
                                  "be lost with their instance)")
        else:
            parts = str(v).split(":")
            if len(parts) < 2:
                raise ConfigError(f"{at}.volumes: '{v}' has no source: an anonymous volume would be lost with "
                                  f"its instance; name it (NAME:{v})")
            source, target = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
        if source.startswith((".", "~")):
            source = str((base / Path(source).expanduser()).resolve()) if source.startswith(".") \
                else str(Path(source).expanduser())
        out.append({"source": source, "target": target, "read_only": ro})
    return out


def _environment(raw: Any, at: str) -> dict[str, str]:
    if raw is None:
        return {}
    if isinstance(raw, Mapping):
        return {str(k): "" if v is None else str(v) for k, v in raw.items()}
    if isinstance(raw, list):
        out = {}
        for item in raw:
            key, sep, value = str(item).partition("=")
            if sep:  # a bare NAME takes the variable from docker compose's own environment: not ours to pass
                out[key] = value
        return out
    raise ConfigError(f"{at}.environment: expected a mapping or a list of KEY=VALUE")


def _env_files(raw: Any, base: Path, at: str) -> dict[str, str]:
    if raw is None:
        return {}
    entries = raw if isinstance(raw, list) else [raw]
    out: dict[str, str] = {}
    for entry in entries:
        file, required = (entry.get("path"), entry.get("required", True)) if isinstance(entry, Mapping) \
            else (entry, True)
        p = base / str(file)
        if not p.is_file():
            if required:
                raise ConfigError(f"{at}.env_file: {p} does not exist")
            continue
        out.update(_dotenv(p, at))
    return out


def _dotenv(p: Path, at: str) -> dict[str, str]:
    """KEY=VALUE lines (comments, blank lines, `export`, single or double quotes), as Compose reads them."""
    try:
        text = p.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"{at}: cannot read {p}: {e}") from None
    out = {}
    for n, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, sep, value = line.removeprefix("export ").partition("=")
        key = key.strip()
        if not sep or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_.-]*", key):
            raise ConfigError(f"{at}: {p} line {n}: expected KEY=VALUE")
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
            value = value[1:-1]
        elif " #" in value:
            value = value.split(" #", 1)[0].rstrip()
        out[key] = value
    return out


def _ports(raw: Any, wanted: Any, at: str) -> dict[str, Any]:
    """ports -> listen and port: the one published TCP port (or the one whose target is x-activator's port)."""
    if raw is not None and not isinstance(raw, list):
        raise ConfigError(f"{at}.ports: expected a list")
    mappings = [_port(p, at) for p in (raw or [])]
    if wanted is not None:
        mappings = [m for m in mappings if m[2] == wanted]
    if len(mappings) != 1:
        have = "no published port" if not mappings else f"{len(mappings)} published ports"
        raise ConfigError(f"{at}.ports: activator serves one port per service and this has {have}; publish one "
                          f"(\"8080:80\"), or set listen and port in {MARK}")
    host, published, target = mappings[0]
    return {"listen": f"[{host}]:{published}" if ":" in host else f"{host}:{published}", "port": target}


def _port(p: Any, at: str) -> tuple[str, int, int]:
    if isinstance(p, Mapping):
        if str(p.get("protocol", "tcp")) != "tcp":
            raise ConfigError(f"{at}.ports: only TCP ports can be served")
        if p.get("published") is None or p.get("target") is None:
            raise ConfigError(f"{at}.ports: a port needs both published and target")
        return str(p.get("host_ip") or "0.0.0.0"), _number(p["published"], at), _number(p["target"], at)
    text = str(p)
    text, _, proto = text.partition("/")
    if proto not in ("", "tcp"):
        raise ConfigError(f"{at}.ports: '{p}': only TCP ports can be served")
    m = re.fullmatch(r"(?:(\[[0-9a-fA-F:.]+\]|[0-9.]+):)?(\d+):(\d+)", text)
    if m is None:
        raise ConfigError(f"{at}.ports: '{p}': expected [HOST_IP:]PUBLISHED:TARGET with one published port")
    host = (m.group(1) or "0.0.0.0").strip("[]")
    return host, _number(m.group(2), at), _number(m.group(3), at)


def _number(v: Any, at: str) -> int:
    try:
        n = int(str(v))
    except ValueError:
        raise ConfigError(f"{at}.ports: '{v}' is not a port number") from None
    return n


def _interpolate(value: Any, env: Mapping[str, str], where: str, at: str) -> Any:
    if isinstance(value, str):
        return _VAR.sub(lambda m: _substitute(m, env, where, at), value)
    if isinstance(value, Mapping):
        return {k: _interpolate(v, env, where, f"{at}.{k}" if at else str(k)) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, where, at) for v in value]
    return value


def _substitute(m: re.Match[str], env: Mapping[str, str], where: str, at: str) -> str:
    if m.group(1):
        return "$"
    name = m.group(2) or m.group(5)
    op, arg = m.group(3), m.group(4) or ""
    value = env.get(name)
    unset_or_empty = value is None or (op is not None and op.startswith(":") and value == "")
    if op in (":-", "-") and unset_or_empty:
        return arg
    if op in (":?", "?") and unset_or_empty:
        raise ConfigError(f"{where}: {at}: ${{{name}}} is required: {arg or 'not set'}")
    return value or ""
