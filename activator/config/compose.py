"""Services taken from a docker-compose.yml: `activator run -c docker-compose.yml`.

A Compose file is recognised by its `x-activator` blocks. Each Compose service that has one (even `{}`) is
served by activator; the others (a database that runs under `docker compose` as usual) are left alone. A
top-level `x-activator: {settings: ...}` holds activator's settings. Keys in a service's `x-activator` block are
activator's own (idle_timeout, max_instances, ...) and win over what is derived.

Every key of the Compose specification's service schema is one of three things (KEYS; tests check the table
against the specification's own key list):

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
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import os
import re
import shlex
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dotenv.parser import parse_stream

from activator.errors import ConfigError, combined

from . import yamlload
from .interpolation import InterpolationError, interpolate
from .units import parse_size

MARK = "x-activator"
#: in translate()'s document: which keys of each service came from its x-activator block (for error paths)
ORIGINS = "x-activator keys"
#: in translate()'s document: the keys ignored, each with why (`activator validate` prints them)
NOTES = "x-activator notes"
#: keys only a Compose service has: a services file with them and no x-activator is a Compose file
COMPOSE_SERVICE_ONLY = frozenset({"ports", "build", "restart", "depends_on", "networks", "container_name",
                                  "expose", "healthcheck", "deploy", "env_file", "labels"})
#: top-level keys of the Compose specification: a file with them and no x-activator block is a Compose file
COMPOSE_TOP_LEVEL = frozenset({"version", "name", "include", "networks", "volumes", "configs", "secrets"})

APPLIED = frozenset({
    "image", "command", "entrypoint", "environment", "env_file", "user", "working_dir", "cap_add", "cap_drop",
    "volumes", "ports", "expose", "hostname", "read_only", "tmpfs", "ulimits", "healthcheck", "mem_limit", "cpus",
    "pids_limit", "deploy", "stop_signal", "stop_grace_period", "extra_hosts", "security_opt", "depends_on",
    "userns_mode",
})
IGNORED = {
    "container_name": "activator names its instances itself",
    "restart": "activator starts instances on demand and restores a new one after a failure",
    "labels": "container metadata for Docker", "annotations": "container metadata for Docker",
    "label_file": "container metadata for Docker",
    "profiles": "it decides what `docker compose up` starts (use it to keep compose from starting this service)",
    "pull_policy": "activator uses the local image (pull or build it first)",
    "pull_refresh_after": "activator uses the local image (pull or build it first)",
    "build": "activator uses the image named by 'image' (build it first)",
    "logging": "activator keeps the app's output itself (`activator logs SERVICE`)",
    "networks": "instances are on activator's own network; services of this file reach each other through "
                "depends_on, others through their published ports",
    "attach": "it concerns `docker compose up`'s terminal", "develop": "it concerns `docker compose watch`",
    "platform": "activator uses the local image as it is",
    "scale": "activator scales on demand (x-activator: max_instances, min_instances)",
}
REFUSED = {
    "privileged": "activator runs instances with Docker's default sandbox only",
    "devices": "activator gives instances Docker's default devices only",
    "device_cgroup_rules": "activator gives instances Docker's default devices only",
    "gpus": "activator gives instances Docker's default devices only",
    "network_mode": "instances get activator's own network (network: bridge or none in x-activator)",
    "sysctls": "activator does not set sysctls in instances",
    "ipc": "instances have their own IPC namespace", "pid": "instances have their own PID namespace",
    "uts": "instances have their own UTS namespace",
    "cgroup": "instances have activator's cgroups", "cgroup_parent": "instances have activator's cgroups",
    "cpu_count": "use cpus", "cpu_percent": "use cpus", "cpu_period": "use cpus", "cpu_quota": "use cpus",
    "cpu_rt_period": "activator sets no real-time CPU budget", "cpu_rt_runtime": "activator sets no real-time "
    "CPU budget", "cpu_shares": "activator sets no CPU weight (cpus: a limit)", "cpuset": "activator pins no CPUs",
    "blkio_config": "activator sets no block I/O limits", "storage_opt": "instances use an overlay on local disk",
    "dns": "instances use the host's resolvers", "dns_opt": "instances use the host's resolvers",
    "dns_search": "instances use the host's resolvers", "domainname": "activator sets the host name only",
    "links": "use depends_on between served services", "external_links": "use depends_on between served services",
    "group_add": "set the groups with 'user' (USER:GROUP)", "isolation": "Linux instances only",
    "mac_address": "activator derives each instance's MAC from its address",
    "mem_reservation": "activator sets limits only (mem_limit)", "mem_swappiness": "activator sets limits only",
    "memswap_limit": "swap is limited to mem_limit", "oom_kill_disable": "the kernel's OOM killer stays on",
    "oom_score_adj": "activator leaves the OOM score alone", "runtime": "instances run under runc",
    "secrets": "mount the secret's file with volumes (read-only)", "configs": "mount the file with volumes",
    "shm_size": "/dev/shm is 64 MiB, as Docker's default", "volumes_from": "name the volumes themselves",
    "credential_spec": "Windows only", "init": "activator runs the image's entrypoint as the app's first process",
    "extends": "write the service out in full", "post_start": "activator runs no lifecycle hooks",
    "pre_stop": "activator runs no lifecycle commands (x-activator: pre_stop: {http_path: ...} is an HTTP hook)",
    "use_api_socket": "instances get no Docker API",
    "models": "activator serves containers only", "provider": "activator serves containers only",
    "stdin_open": "instances have no stdin", "tty": "instances have no terminal",
}
#: deploy's keys (swarm's): resources.limits is applied, reservations refused, the rest ignored
DEPLOY_IGNORED = {"mode", "replicas", "placement", "restart_policy", "update_config", "rollback_config", "labels",
                  "endpoint_mode"}
#: depends_on conditions; a dependency served by activator is reached through its own listener, so a connection to
#: it waits for its restore, and it is restored from a checkpoint made once its healthcheck passed
#: settings.network.subnet's default (model imports this module, so not from there; a test keeps them equal)
DEFAULT_SUBNET = "10.89.0.0/24"
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


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
    env = {k: v for k, v in _dotenv(path.parent / ".env", where, shell.get, problems).items() if v is not None}
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
        ctx = _Context(f"{where}: services.{name}", path.parent, env, top_volumes, served, notes, bodies, gateway,
                       problems)
        with ctx.collect():
            services[name] = _service(body, ctx)
        if isinstance(body.get(MARK), Mapping):
            origins[name] = [str(k) for k in body[MARK]]
    if problems:
        raise _all(problems)
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


@dataclass(frozen=True)
class _Context:
    at: str  # "FILE: services.NAME"
    base: Path
    env: Mapping[str, str]
    top_volumes: Mapping[str, Any]
    served: set[str]
    notes: list[str]
    #: the served services' bodies, interpolated (a dependency's healthcheck is looked up there)
    bodies: Mapping[str, Any] = field(default_factory=dict)
    gateway: str = "10.89.0.1"
    problems: list[str] = field(default_factory=list)

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.at}.{key}: {problem}")

    def note(self, key: str, why: str) -> None:
        self.tell(key, f"ignored: {why}")

    def tell(self, key: str, text: str) -> None:
        self.notes.append(f"{self.at.split(': ', 1)[1]}{'.' + key if key else ''}: {text}")

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """A problem in the block is kept, and the translation goes on to find the others."""
        try:
            yield
        except ConfigError as e:
            self.problems.extend(e.lines)


def _all(problems: list[str]) -> ConfigError:
    """One error for all of them (ConfigErrors when there are several: each its own line)."""
    error = combined([ConfigError(p) for p in problems])
    assert isinstance(error, ConfigError)  # all of them are
    return error


def _is_set(value: Any) -> bool:
    """Whether a key says something (`tty: false`, `init: null` and `sysctls: {}` say nothing)."""
    return value is not None and value is not False and value != "" and value != [] and value != {}


def _service(body: Any, ctx: _Context) -> dict[str, Any]:
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
                if _is_set(v):
                    raise ctx.error(k, f"not supported ({REFUSED[k]}); remove it or leave this service to docker "
                                       "compose")
            elif k in IGNORED:
                if _is_set(v):
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
            out["volumes"], tmpfs = _volumes(body["volumes"], ctx)
            if tmpfs:
                out["tmpfs"] = [*out.get("tmpfs", []), *tmpfs]
    environment: dict[str, str] = {}
    with ctx.collect():
        environment.update(_env_files(body.get("env_file"), ctx))
    with ctx.collect():
        environment.update(_environment(body.get("environment"), ctx))
    if environment:
        out["environment"] = environment
    with ctx.collect():
        if body.get("stop_grace_period") is not None:
            out["stop_grace"] = _go_duration(body["stop_grace_period"], ctx, "stop_grace_period")
    with ctx.collect():
        if body.get("extra_hosts") is not None:
            out["extra_hosts"] = _extra_hosts(body["extra_hosts"], ctx)
    with ctx.collect():
        if body.get("security_opt") is not None:
            out.update(_security_opt(body["security_opt"], ctx))
    with ctx.collect():
        if body.get("userns_mode") is not None:
            if body["userns_mode"] != "host":
                raise ctx.error("userns_mode", f"'{str(body['userns_mode'])[:40]}' is not supported: every service "
                                               "has a user namespace of its own unless this says host")
            out["userns"] = "host"
    with ctx.collect():
        if resources := _resources(body, ctx):
            out["resources"] = resources
    with ctx.collect():
        if readiness := _healthcheck(body.get("healthcheck"), ctx):
            out["readiness"] = readiness
    with ctx.collect():
        if body.get("depends_on") is not None:
            out["depends_on"] = _depends_on(body["depends_on"], ctx)
    with ctx.collect():
        out.update({k: v for k, v in _ports(body, own, ctx).items() if k not in own})
    for k, v in own.items():  # activator's own keys win; its readiness and resources add to the derived ones
        if k in ("readiness", "resources") and isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _go_parts(text: str) -> list[tuple[str, str]]:
    """Go's duration (1h2m3.5s, 500ms, 250us) as (number, unit) pairs; [] when it is not one."""
    parts: list[tuple[str, str]] = _GO_DURATION.findall(text)
    return parts if text and "".join(n + u for n, u in parts) == text else []


def _go_duration(raw: Any, ctx: _Context, key: str) -> float:
    """Compose's durations (Go's: 1m30s, 500ms, 10s) -> seconds."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    text = str(raw).strip()
    parts = _go_parts(text)
    if not parts:
        raise ctx.error(key, f"'{text[:40]}' is not a duration (e.g. 10s, 1m30s, 500ms)")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def _resources(body: Mapping[str, Any], ctx: _Context) -> dict[str, Any]:
    """mem_limit, cpus, pids_limit and deploy.resources.limits -> resources (memory, cpus, pids)."""
    out: dict[str, Any] = {}
    deploy = body.get("deploy")
    if deploy is not None:
        if not isinstance(deploy, Mapping):
            raise ctx.error("deploy", "expected a mapping")
        for k, v in deploy.items():
            if k in DEPLOY_IGNORED:
                if _is_set(v):
                    ctx.note(f"deploy.{k}", "swarm's business; activator scales on demand (x-activator: "
                                            "max_instances)" if k == "replicas" else "swarm's business")
            elif k != "resources" and not str(k).startswith("x-"):
                raise ctx.error(f"deploy.{str(k)[:40]}", "not a key of deploy")
        res = deploy.get("resources") or {}
        if not isinstance(res, Mapping) or set(res) - {"limits", "reservations"}:
            raise ctx.error("deploy.resources", "expected limits (and reservations)")
        if _is_set(res.get("reservations")):
            raise ctx.error("deploy.resources.reservations", "not supported (activator sets limits only); remove "
                                                             "it or leave this service to docker compose")
        limits = res.get("limits") or {}
        if not isinstance(limits, Mapping) or set(limits) - {"memory", "cpus", "pids"}:
            raise ctx.error("deploy.resources.limits", "expected memory, cpus and pids")
        for k, ours in (("memory", "memory"), ("cpus", "cpus"), ("pids", "pids")):
            if limits.get(k) is not None:
                out[ours] = _limit(ours, limits[k], ctx, f"deploy.resources.limits.{k}")
    for k, ours in (("mem_limit", "memory"), ("cpus", "cpus"), ("pids_limit", "pids")):
        if body.get(k) is not None:
            value = _limit(ours, body[k], ctx, k)
            if ours in out and out[ours] != value:
                raise ctx.error(k, f"says {body[k]} and deploy.resources.limits says otherwise; keep one")
            out[ours] = value
    return {k: v for k, v in out.items() if v is not None}


def _limit(kind: str, raw: Any, ctx: _Context, key: str) -> Any:
    try:
        if kind == "memory":
            return parse_size(raw)
        if kind == "cpus":
            value = float(raw)
            return None if value == 0 else value  # 0: no limit, as Docker reads it
        n = int(raw)
        return None if n <= 0 else n  # -1 (or 0): no limit
    except (ValueError, TypeError) as e:
        raise ctx.error(key, str(e)) from None


def _healthcheck(raw: Any, ctx: _Context) -> dict[str, Any]:
    """A healthcheck -> the readiness check before the dump: its test runs in the template until it passes."""
    if raw is None:
        return {}
    if not isinstance(raw, Mapping):
        raise ctx.error("healthcheck", "expected a mapping")
    if raw.get("disable") is True:
        return {}
    test = raw.get("test")
    if isinstance(test, list) and test and test[0] == "NONE":
        return {}
    if isinstance(test, str):
        command: list[str] = [test]
    elif isinstance(test, list) and len(test) >= 2 and test[0] == "CMD":
        command = [str(a) for a in test[1:]]
    elif isinstance(test, list) and len(test) == 2 and test[0] == "CMD-SHELL":
        command = [str(test[1])]
    else:
        raise ctx.error("healthcheck.test", "expected [CMD, ARG...], [CMD-SHELL, COMMAND], [NONE] or a string")
    out: dict[str, Any] = {"command": command}
    durations = {k: _go_duration(raw[k], ctx, f"healthcheck.{k}") for k in
                 ("interval", "timeout", "start_period", "start_interval") if raw.get(k) is not None}
    if "timeout" in durations:
        out["command_timeout"] = max(0.1, durations["timeout"])
    if {"start_period", "interval", "timeout"} & set(durations) or raw.get("retries") is not None:
        # as long as Compose would wait before it called the container unhealthy, and never less than the default
        retries = int(raw.get("retries") or 3)
        budget = durations.get("start_period", 0) + retries * (durations.get("interval", 30) +
                                                               durations.get("timeout", 30))
        out["timeout"] = min(3600.0, max(60.0, budget))
    return out


def _depends_on(raw: Any, ctx: _Context) -> list[str]:
    """The served services among depends_on (the others run under docker compose: nothing for us to wake), each
    condition mapped or refused in one line, and what differs said in a note."""
    if isinstance(raw, list):
        entries: dict[str, Any] = {str(n): {} for n in raw}
    elif isinstance(raw, Mapping):
        entries = {str(n): {} if v is None else v for n, v in raw.items()}
    else:
        raise ctx.error("depends_on", "expected a list or a mapping of service names")
    out: list[str] = []
    for n, spec in entries.items():
        at = f"depends_on.{n}"
        if not isinstance(spec, Mapping):
            raise ctx.error(at, "expected a mapping (condition, restart, required)")
        if bad := sorted(str(k) for k in spec if k not in ("condition", "restart", "required")
                         and not str(k).startswith("x-")):
            raise ctx.error(f"{at}.{bad[0][:40]}", "not a key of depends_on (condition, restart, required)")
        condition = str(spec.get("condition", "service_started"))
        if condition not in CONDITIONS:
            raise ctx.error(f"{at}.condition", f"'{condition[:40]}' is not a condition ({', '.join(CONDITIONS)})")
        if _is_set(spec.get("restart")):
            ctx.note(f"{at}.restart", "activator restarts no dependant (a dependant's connections to this "
                                      "dependency wait for its restore instead)")
        if n not in ctx.served:
            waited = "" if condition == "service_started" else f", nor waited for ({condition} is docker compose's)"
            ctx.note(at, f"not served by activator (it runs under docker compose); its instances are not woken "
                         f"with this one{waited}")
            continue
        if condition == "service_completed_successfully":
            raise ctx.error(f"{at}.condition", f"service_completed_successfully: '{n}' is served on demand and "
                                               "never completes; leave a one-off job (a migration) to docker compose "
                                               f"(remove {n}'s {MARK} block)")
        if condition == "service_healthy":
            if not _has_health_check(ctx.bodies.get(n)):
                raise ctx.error(f"{at}.condition", f"service_healthy, but '{n}' has no healthcheck (docker compose "
                                                   f"refuses this too): give {n} a healthcheck, or use "
                                                   "condition: service_started")
            ctx.tell(at, f"service_healthy: {n} is restored from its checkpoint, made once its healthcheck passed "
                         "(the check is not run again), and this service's connections to it wait for its restore")
        out.append(n)
    return out


def _has_health_check(body: Any) -> bool:
    """Whether a served service's template is checked before its dump (a healthcheck, or x-activator readiness)."""
    if not isinstance(body, Mapping):
        return False
    own = body.get(MARK)
    if isinstance(own, Mapping) and isinstance(own.get("readiness"), Mapping) and own["readiness"]:
        return True
    check = body.get("healthcheck")
    if not isinstance(check, Mapping) or check.get("disable") is True:
        return False
    test = check.get("test")
    return bool(test) and not (isinstance(test, list) and test[0] == "NONE")


def _extra_hosts(raw: Any, ctx: _Context) -> dict[str, str]:
    """HOST:IP, HOST=IP (IPv6 in brackets or after '='), or {HOST: IP} -> {HOST: IP}."""
    out: dict[str, str] = {}
    if isinstance(raw, Mapping):
        for host, addr in raw.items():
            addrs = addr if isinstance(addr, list) else [addr]
            if len(addrs) != 1:
                raise ctx.error("extra_hosts", f"'{host}': one address per name")
            out[str(host)] = str(addrs[0]).strip("[]")
        return out
    if not isinstance(raw, list):
        raise ctx.error("extra_hosts", "expected a list of HOST:IP or a mapping")
    for item in raw:
        text = str(item)
        host, sep, addr = text.partition("=") if "=" in text else text.partition(":")
        if not sep:
            raise ctx.error("extra_hosts", f"'{text[:60]}' is not HOST:IP or HOST=IP")
        out[host] = addr.strip("[]")
    return out


def _security_opt(raw: Any, ctx: _Context) -> dict[str, Any]:
    """seccomp=PROFILE|unconfined -> seccomp; no-new-privileges (always set by activator) accepted; the rest
    refused."""
    if not isinstance(raw, list):
        raise ctx.error("security_opt", "expected a list")
    out: dict[str, Any] = {}
    for item in raw:
        text = str(item)
        name, _, value = text.partition("=") if "=" in text else text.partition(":")
        if name == "seccomp" and value:
            out["seccomp"] = value if value == "unconfined" else str((ctx.base / value).resolve())
        elif name == "no-new-privileges" and value in ("", "true"):
            continue  # activator sets no_new_privs on every instance anyway
        else:
            raise ctx.error("security_opt", f"'{text[:60]}' is not supported (seccomp=PROFILE, seccomp=unconfined "
                                            "and no-new-privileges are: activator applies no AppArmor or SELinux "
                                            "label, and always sets no-new-privileges)")
    return out


def _volumes(raw: Any, ctx: _Context) -> tuple[list[Any], list[str]]:
    """Compose volumes -> activator's, and tmpfs entries: relative and ~ host paths resolved against the Compose
    file's directory; a named volume is the top-level volume's Docker volume when that is `external: true`, else
    activator's own (state_dir/volumes/NAME: docker compose's volume of that name is not shared)."""
    if not isinstance(raw, list):
        raise ctx.error("volumes", "expected a list")
    out: list[Any] = []
    tmpfs: list[str] = []
    for v in raw:
        if isinstance(v, Mapping):
            kind = v.get("type", "volume")
            if kind == "tmpfs":
                size = (v.get("tmpfs") or {}).get("size")
                mode = (v.get("tmpfs") or {}).get("mode")
                opts = [*([f"size={size}"] if size is not None else []), *([f"mode={mode:o}" if isinstance(mode, int)
                                                                            else f"mode={mode}"] if mode else [])]
                tmpfs.append(f"{v.get('target')}{':' + ','.join(opts) if opts else ''}")
                continue
            if kind not in ("volume", "bind"):
                raise ctx.error("volumes", f"type {kind} is not supported (bind, volume or tmpfs)")
            source, target, ro = v.get("source"), v.get("target"), bool(v.get("read_only", False))
            owners: dict[str, bool] = {}
            if not isinstance(source, str) or not isinstance(target, str):
                raise ctx.error("volumes", "a volume needs source and target (anonymous volumes would be lost with "
                                           "their instance)")
        else:
            parts = str(v).split(":")
            if len(parts) < 2:
                raise ctx.error("volumes", f"'{v}' has no source: an anonymous volume would be lost with its "
                                           f"instance; name it (NAME:{v})")
            source, target = parts[0], parts[1]
            opts = parts[2].split(",") if len(parts) > 2 else []
            ro = "ro" in opts
            # Podman's owner options (Compose files written for podman-compose carry them): activator's own
            owners = {k: True for o, k in (("U", "chown"), ("idmap", "idmap")) if o in opts}
        if source.startswith((".", "~", "/")):
            if source.startswith("."):
                source = str((ctx.base / source).resolve())
            elif source.startswith("~"):
                source = str(Path(source).expanduser())
            out.append({"source": source, "target": target, "read_only": ro} | owners)
            continue
        decl = ctx.top_volumes.get(source, {}) or {}
        if source not in ctx.top_volumes:
            raise ctx.error("volumes", f"'{source}' is not declared under the top-level volumes: (Compose "
                                       f"requires it); add `volumes: {{{source}: {{}}}}`")
        if not isinstance(decl, Mapping):
            raise ctx.error("volumes", f"volumes.{source}: expected a mapping")
        if decl.get("external"):
            out.append({"source": str(decl.get("name") or source), "target": target, "read_only": ro,
                        "external": True})
            continue
        if (_is_set(decl.get("driver")) and decl.get("driver") != "local") or _is_set(decl.get("driver_opts")):
            raise ctx.error("volumes", f"'{source}': a volume with a driver or driver_opts is not supported; "
                                       "create it with docker volume create and mark it external: true")
        ctx.note(f"volumes.{source}", f"kept by activator in state_dir/volumes/{source}, not shared with docker "
                                      "compose's volume of that name (mark it external: true to use Docker's)")
        out.append({"source": source, "target": target, "read_only": ro})
    return out, tmpfs


def _environment(raw: Any, ctx: _Context) -> dict[str, str]:
    """A mapping or KEY=VALUE list; a bare KEY (or KEY: null) takes KEY from the environment, as Compose does,
    and is left out when unset. Booleans are refused as Compose refuses them."""
    if raw is None:
        return {}
    out: dict[str, str] = {}
    if isinstance(raw, Mapping):
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, list):
        items = []
        for item in raw:
            key, sep, value = str(item).partition("=")
            items.append((key, value if sep else None))
    else:
        raise ctx.error("environment", "expected a mapping or a list of KEY=VALUE")
    bad: list[str] = []
    for key, value in items:
        if isinstance(value, bool):
            bad.append(str(ctx.error(f"environment.{key}", f"{str(value).lower()} is a boolean; Compose wants a "
                                                           f"string: quote it ('{str(value).lower()}')")))
        elif value is None:
            if key in ctx.env:
                out[key] = ctx.env[key]
        else:
            out[key] = str(value)
    if bad:
        raise _all(bad)
    return out


def _env_files(raw: Any, ctx: _Context) -> dict[str, str]:
    if raw is None:
        return {}
    entries = raw if isinstance(raw, list) else [raw]
    out: dict[str, str] = {}
    problems: list[str] = []
    for entry in entries:
        file, required = (entry.get("path"), entry.get("required", True)) if isinstance(entry, Mapping) \
            else (entry, True)
        p = ctx.base / str(file)
        if not p.is_file():
            if required:
                problems.append(f"{ctx.at}.env_file: {p} does not exist")
            continue
        values = _dotenv(p, ctx.at, ctx.env.get, problems)
        out.update({k: v for k, v in values.items() if v is not None})
    if problems:
        raise _all(problems)
    return out


def _dotenv(p: Path, at: str, lookup: Any, problems: list[str]) -> dict[str, str | None]:
    """A .env or env_file file as docker compose reads it (python-dotenv's parser: quotes, escapes in double
    quotes, `export`, comments); unquoted and double-quoted values interpolated from `lookup` and the file's
    earlier keys, single-quoted ones as they are. A bare KEY takes KEY from `lookup` (left out when unset).
    Malformed lines are added to `problems`, one each."""
    try:
        text = p.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{at}: cannot read {p}: {e}")
        return {}
    out: dict[str, str | None] = {}

    def known(name: str) -> str | None:
        value = lookup(name)
        return value if value is not None else out.get(name)

    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line + len(binding.original.string) - len(binding.original.string.lstrip("\n"))
        if binding.error:
            problems.append(f"{at}: {p} line {line}: expected KEY=VALUE")
            continue
        if binding.key is None:
            continue  # a comment or a blank line
        if binding.value is None:
            out[binding.key] = lookup(binding.key)
            continue
        written = binding.original.string.strip().removeprefix("export").lstrip()
        written = written.split("=", 1)[1].lstrip() if "=" in written else ""
        if written.startswith("'"):
            out[binding.key] = binding.value
            continue
        try:
            out[binding.key] = interpolate(binding.value, known).text
        except InterpolationError as e:
            problems.append(f"{at}: {p} line {line}: {e}")
    return out


def _ports(body: Mapping[str, Any], own: Mapping[str, Any], ctx: _Context) -> dict[str, Any]:
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
        raise _all(bad)
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


def _internal(body: Mapping[str, Any], own: Mapping[str, Any], ctx: _Context) -> dict[str, Any]:
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


def _exposed(raw: Any, ctx: _Context) -> list[tuple[int, str]]:
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


def _port(p: Any, ctx: _Context) -> tuple[str, int, int, str]:
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


def _number(v: Any, ctx: _Context) -> int:
    try:
        return int(str(v))
    except ValueError:
        raise ctx.error("ports", f"'{str(v)[:20]}' is not a port number") from None


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
