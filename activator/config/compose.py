"""Services taken from a docker-compose.yml: `activator run -c docker-compose.yml`.

A Compose file is recognised by its `x-activator` blocks. Each Compose service that has one (even `{}`) is
served by activator; the others (a database that runs under `docker compose` as usual) are left alone. A
top-level `x-activator: {settings: ...}` holds activator's settings. Keys in a service's `x-activator` block are
activator's own (idle_timeout, max_instances, ...) and win over what is derived.

Every key of the Compose specification's service schema is one of three things (composekeys.py; tests check
the table against the specification's own key list):

- applied: what it gives the app, the app gets (image, command, environment, ports, volumes, resources,
  capabilities, read-only root, tmpfs, ulimits, hostname, extra_hosts, stop signal and grace, the healthcheck as
  the readiness check, a seccomp profile, depends_on between served services);
- ignored: docker compose's business that does not change what the app gets (restart, labels, profiles, ...);
  `activator validate` names each one it ignored, and why;
- refused when set, in one line: the app would silently get something else (privileged, sysctls, dns, ...).

The file is read as docker compose reads it:

- interpolation (interpolation.py: `$$`, `$VAR`, `${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`,
  `${VAR?error}`, `${VAR:+alt}`, `${VAR+alt}`, nested) from the environment, then the `.env` file next to the
  Compose file, in the served services, the top-level x-activator and volumes (the services left to docker
  compose are not ours to read); an unset variable is an empty string and a note, as compose warns;
- `.env` and env_file files are parsed by python-dotenv (quotes, `export`, inline comments: Compose's dotenv
  rules), and their unquoted and double-quoted values interpolated (single-quoted ones are literal);
- unquoted yes/no/on/off are the words, not booleans (YAML 1.2, as compose reads it), outside x-activator blocks
  (activator's own keys are read as in activator's own file);
- a bare `- VAR` (or `VAR:` with no value) in environment takes VAR from the environment and .env, and is left
  out when it is unset.

Ports: the published ports of one app port become its listen addresses; `/udp` ones make it a UDP service
(`protocol: udp`, or `[tcp, udp]` when both are published on the same addresses). A service that publishes no
port (a database the other services use) is served on the bridge's address only (10.89.0.1 with the default
subnet), on its x-activator port or the port it exposes: the other services' instances reach it there, and
nothing off this host does; a note says so.

Every problem of the file is found in one run: translate() raises them together (ConfigErrors, a line each).

Pure, apart from reading the .env and env_file files next to the Compose file.

This module walks the document (translate()); its rooms: composecontext.py (what a service's translation
carries: where, notes, problems), composekeys.py (the key table, and the keys that map one to one-ish),
composeenv.py (environment, env_file, .env), composevolumes.py, composeports.py.
"""

from __future__ import annotations

import ipaddress
import os
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from activator.errors import ConfigError

from . import composeenv, composekeys, composeports, composevolumes, yamlload
from .composecontext import MARK, Context, all_of, is_set
from .composeenv import dotenv
from .composekeys import APPLIED, DEPLOY_IGNORED, IGNORED, REFUSED
from .interpolation import InterpolationError, interpolate

__all__ = ["APPLIED", "COMPOSE_SERVICE_ONLY", "COMPOSE_TOP_LEVEL", "DEFAULT_SUBNET", "DEPLOY_IGNORED", "IGNORED",
           "MARK", "NOTES", "ORIGINS", "REFUSED", "is_compose", "translate"]


#: in translate()'s document: which keys of each service came from its x-activator block (for error paths)
ORIGINS = "x-activator keys"
#: in translate()'s document: the keys ignored, each with why (`activator validate` prints them)
NOTES = "x-activator notes"
#: keys only a Compose service has: a services file with them and no x-activator is a Compose file
COMPOSE_SERVICE_ONLY = frozenset({"ports", "build", "restart", "depends_on", "networks", "container_name",
                                  "expose", "healthcheck", "deploy", "env_file", "labels"})
#: top-level keys of the Compose specification: a file with them and no x-activator block is a Compose file
COMPOSE_TOP_LEVEL = frozenset({"version", "name", "include", "networks", "volumes", "configs", "secrets"})
#: settings.network.subnet's default (model imports this module, so not from there; a test keeps them equal)
DEFAULT_SUBNET = "10.89.0.0/24"


def is_compose(raw: Mapping[str, Any]) -> bool:
    services = raw.get("services")
    return MARK in raw or (isinstance(services, Mapping)
                           and any(isinstance(s, Mapping) and MARK in s for s in services.values()))


def translate(raw: Mapping[str, Any], path: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The activator services document for a Compose document (and, under ORIGINS, which keys came from each
    service's x-activator block; under NOTES, what was ignored or derived). Raises ConfigError, or ConfigErrors
    with every problem of the file, one line each."""
    where = str(path)
    shell = os.environ if environ is None else environ
    problems: list[str] = []
    notes: list[str] = []
    env = {k: v for k, v in dotenv(path.parent / ".env", where, shell.get, problems).items() if v is not None}
    env.update(shell)
    raw = _as_compose_reads(raw)
    top = raw.get(MARK) or {}
    if not isinstance(top, Mapping) or set(top) - {"settings"}:
        raise ConfigError(f"{where}: {MARK}: expected a mapping with only 'settings:' (service keys go in each "
                          f"service's own {MARK} block)")
    if not isinstance(raw.get("services"), Mapping):
        raise ConfigError(f"{where}: services: expected a mapping of Compose services")
    served = {str(n) for n, b in raw["services"].items() if isinstance(b, Mapping) and MARK in b}
    if not served:
        raise ConfigError(f"{where}: no Compose service has an '{MARK}' block; add `{MARK}: {{}}` to each service "
                          "activator should serve")
    # Interpolated: what activator reads. The services left to docker compose are its business (a variable only
    # their `docker compose up` has must not stop activator).
    unset: dict[str, str] = {}
    top = _interpolate(top, env, where, MARK, problems, unset)
    top_volumes = _interpolate(raw.get("volumes") or {}, env, where, "volumes", problems, unset)
    found: dict[str, list[str]] = {n: [] for n in served}  # each service's problems, said in the file's order
    bodies = {str(n): _interpolate(b, env, where, f"services.{n}", found[str(n)], unset)
              for n, b in raw["services"].items() if str(n) in served}
    notes += [f"{at}: ${{{name}}} is not set: an empty string, as docker compose reads it (compose warns too)"
              for name, at in unset.items()]
    if not isinstance(top_volumes, Mapping):
        problems.append(f"{where}: volumes: expected a mapping of volume names")
        top_volumes = {}
    gateway = _gateway(top)
    services: dict[str, Any] = {}
    origins: dict[str, list[str]] = {}
    for name, body in bodies.items():
        problems += found[name]
        ctx = Context(f"{where}: services.{name}", path.parent, env, top_volumes, served, notes, bodies, gateway,
                       problems)
        with ctx.collect():
            services[name] = _service(body, ctx)
        if isinstance(body.get(MARK), Mapping):
            origins[name] = [str(k) for k in body[MARK]]
    if problems:
        raise all_of(problems)
    doc: dict[str, Any] = {"services": services, ORIGINS: origins, NOTES: notes}
    if top.get("settings") is not None:
        doc["settings"] = top["settings"]
    return doc


def _as_compose_reads(value: Any) -> Any:
    """The document with yes/no/on/off as the words they are to docker compose (YAML 1.2), outside x-activator
    blocks (activator's own keys, read as in activator's own file)."""
    if isinstance(value, Mapping):
        words = yamlload.words_of(value)
        return {k: v if k == MARK else words[k] if k in words else _as_compose_reads(v) for k, v in value.items()}
    if isinstance(value, list):
        words = yamlload.words_of(value)
        return [words[i] if i in words else _as_compose_reads(v) for i, v in enumerate(value)]
    return value


def _gateway(top: Mapping[str, Any]) -> str:
    """The bridge's address (the subnet's first): where a service with no published port is served."""
    settings = top.get("settings")
    network = settings.get("network") if isinstance(settings, Mapping) else None
    subnet = network.get("subnet") if isinstance(network, Mapping) else None
    try:
        if subnet is not None:
            return str(next(ipaddress.IPv4Network(str(subnet)).hosts()))
    except (ValueError, StopIteration):
        pass  # the settings' own check says what is wrong with it
    return str(next(ipaddress.IPv4Network(DEFAULT_SUBNET).hosts()))


def _service(body: Any, ctx: Context) -> dict[str, Any]:
    if not isinstance(body, Mapping):
        raise ConfigError(f"{ctx.at}: expected a mapping of Compose service keys")
    own = body[MARK] if body[MARK] is not None else {}
    if not isinstance(own, Mapping):
        raise ctx.error(MARK, "expected a mapping of activator's service keys")
    for k, v in body.items():
        k = str(k)
        if k == MARK or k.startswith("x-") or k in APPLIED:
            continue
        with ctx.collect():
            if k in REFUSED:
                if is_set(v):
                    raise ctx.error(k, f"not supported ({REFUSED[k]}); remove it or leave this service to docker "
                                       "compose")
            elif k in IGNORED:
                if is_set(v):
                    ctx.note(k, IGNORED[k])
            else:
                raise ctx.error(k[:60], "not a key of a Compose service (the Compose specification has no such key)")
    out: dict[str, Any] = {}
    if "image" in body:
        out["image"] = body["image"]
    elif "image" not in own:
        ctx.problems.append(str(ctx.error("image", "missing (activator does not build): build the image and name "
                                                   "it with 'image:'")))
    for key in ("command", "entrypoint"):
        if isinstance(body.get(key), str):
            try:
                out[key] = shlex.split(body[key])  # what Compose does with a string
            except ValueError as e:
                ctx.problems.append(str(ctx.error(key, str(e))))
        elif body.get(key) is not None:
            out[key] = body[key]
    for key in ("user", "working_dir", "hostname", "stop_signal"):
        if body.get(key) is not None:
            out[key] = str(body[key])
    for key in ("cap_add", "cap_drop", "read_only", "ulimits"):  # the same names and meaning as activator's keys
        if body.get(key) is not None:
            out[key] = body[key]
    if body.get("tmpfs") is not None:
        out["tmpfs"] = [body["tmpfs"]] if isinstance(body["tmpfs"], str) else body["tmpfs"]
    if body.get("volumes"):
        with ctx.collect():
            out["volumes"], tmpfs = composevolumes.volumes(body["volumes"], ctx)
            if tmpfs:
                out["tmpfs"] = [*out.get("tmpfs", []), *tmpfs]
    environment: dict[str, str] = {}
    with ctx.collect():
        environment.update(composeenv.env_files(body.get("env_file"), ctx))
    with ctx.collect():
        environment.update(composeenv.environment(body.get("environment"), ctx))
    if environment:
        out["environment"] = environment
    with ctx.collect():
        if body.get("stop_grace_period") is not None:
            out["stop_grace"] = composekeys.go_duration(body["stop_grace_period"], ctx, "stop_grace_period")
    with ctx.collect():
        if body.get("extra_hosts") is not None:
            out["extra_hosts"] = composekeys.extra_hosts(body["extra_hosts"], ctx)
    with ctx.collect():
        if body.get("security_opt") is not None:
            out.update(composekeys.security_opt(body["security_opt"], ctx))
    with ctx.collect():
        if body.get("userns_mode") is not None:
            if body["userns_mode"] != "host":
                raise ctx.error("userns_mode", f"'{str(body['userns_mode'])[:40]}' is not supported: every service "
                                               "has a user namespace of its own unless this says host")
            out["userns"] = "host"
    with ctx.collect():
        if resources := composekeys.resources(body, ctx):
            out["resources"] = resources
    with ctx.collect():
        if readiness := composekeys.healthcheck(body.get("healthcheck"), ctx):
            out["readiness"] = readiness
    with ctx.collect():
        if body.get("depends_on") is not None:
            out["depends_on"] = composekeys.depends_on(body["depends_on"], ctx)
    with ctx.collect():
        out.update({k: v for k, v in composeports.ports(body, own, ctx).items() if k not in own})
    for k, v in own.items():  # activator's own keys win; its readiness and resources add to the derived ones
        if k in ("readiness", "resources") and isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _interpolate(value: Any, env: Mapping[str, str], where: str, at: str, problems: list[str],
                 unset: dict[str, str]) -> Any:
    """Every string of `value` interpolated; a problem is added to `problems` (its string then left as it is),
    and each unset variable's first place to `unset`."""
    if isinstance(value, str):
        try:
            result = interpolate(value, env.get)
        except InterpolationError as e:
            problems.append(f"{where}: {at}: {e}")
            return value
        for name in result.unset:
            unset.setdefault(name, at)
        return result.text
    if isinstance(value, Mapping):
        return {k: _interpolate(v, env, where, f"{at}.{k}" if at else str(k), problems, unset)
                for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, env, where, at, problems, unset) for v in value]
    return value
