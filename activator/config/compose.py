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

`${VAR}`, `${VAR:-default}`, `${VAR-default}`, `${VAR:?error}`, `${VAR?error}`, `$VAR` and `$$` are
interpolated as Compose does, from the environment and the `.env` file next to the Compose file; a bare
`- VAR` (or `VAR:` with no value) in environment takes VAR from there too, and is left out when it is unset.

Pure, apart from reading the .env and env_file files next to the Compose file.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activator.errors import ConfigError

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
    "volumes", "ports", "hostname", "read_only", "tmpfs", "ulimits", "healthcheck", "mem_limit", "cpus",
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
    "expose": "it documents ports only",
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
_VAR = re.compile(r"\$(?:(\$)|\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}|([A-Za-z_][A-Za-z0-9_]*))")
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def is_compose(raw: Mapping[str, Any]) -> bool:
    services = raw.get("services")
    return MARK in raw or (isinstance(services, Mapping)
                           and any(isinstance(s, Mapping) and MARK in s for s in services.values()))


def translate(raw: Mapping[str, Any], path: Path, environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The activator services document for a Compose document (and, under ORIGINS, which keys came from each
    service's x-activator block; under NOTES, what was ignored). Raises ConfigError (one line)."""
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
    top_volumes = raw.get("volumes") or {}
    if not isinstance(top_volumes, Mapping):
        raise ConfigError(f"{where}: volumes: expected a mapping of volume names")
    served = {str(n) for n, b in raw["services"].items() if isinstance(b, Mapping) and MARK in b}
    services: dict[str, Any] = {}
    origins: dict[str, list[str]] = {}
    notes: list[str] = []
    for name, body in raw["services"].items():
        if str(name) in served:
            ctx = _Context(f"{where}: services.{name}", path.parent, env, top_volumes, served, notes)
            services[name] = _service(body, ctx)
            if isinstance(body[MARK], Mapping):
                origins[str(name)] = [str(k) for k in body[MARK]]
    if not services:
        raise ConfigError(f"{where}: no Compose service has an '{MARK}' block; add `{MARK}: {{}}` to each service "
                          "activator should serve")
    doc: dict[str, Any] = {"services": services, ORIGINS: origins, NOTES: notes}
    if top.get("settings") is not None:
        doc["settings"] = top["settings"]
    return doc


@dataclass(frozen=True)
class _Context:
    at: str  # "FILE: services.NAME"
    base: Path
    env: Mapping[str, str]
    top_volumes: Mapping[str, Any]
    served: set[str]
    notes: list[str]

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.at}.{key}: {problem}")

    def note(self, key: str, why: str) -> None:
        self.notes.append(f"{self.at.split(': ', 1)[1]}.{key}: ignored: {why}")


def _is_set(value: Any) -> bool:
    """Whether a key says something (`tty: false`, `init: null` and `sysctls: {}` say nothing)."""
    return value is not None and value is not False and value != "" and value != [] and value != {}


def _service(body: Mapping[str, Any], ctx: _Context) -> dict[str, Any]:
    own = body[MARK] if body[MARK] is not None else {}
    if not isinstance(own, Mapping):
        raise ctx.error(MARK, "expected a mapping of activator's service keys")
    for k, v in body.items():
        k = str(k)
        if k == MARK or k.startswith("x-") or k in APPLIED:
            continue
        if k in REFUSED:
            if _is_set(v):
                raise ctx.error(k, f"not supported ({REFUSED[k]}); remove it or leave this service to docker "
                                   "compose")
        elif k in IGNORED:
            if _is_set(v):
                ctx.note(k, IGNORED[k])
        else:
            raise ctx.error(k[:60], "not a key of a Compose service (the Compose specification has no such key)")
    if "image" not in body and "image" not in own:
        raise ctx.error("image", "missing (activator does not build): build the image and name it with 'image:'")
    out: dict[str, Any] = {}
    if "image" in body:
        out["image"] = body["image"]
    for key in ("command", "entrypoint"):
        if isinstance(body.get(key), str):
            try:
                out[key] = shlex.split(body[key])  # what Compose does with a string
            except ValueError as e:
                raise ctx.error(key, str(e)) from None
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
        out["volumes"], tmpfs = _volumes(body["volumes"], ctx)
        if tmpfs:
            out["tmpfs"] = [*out.get("tmpfs", []), *tmpfs]
    environment = _env_files(body.get("env_file"), ctx.base, ctx.at)
    environment.update(_environment(body.get("environment"), ctx))
    if environment:
        out["environment"] = environment
    if body.get("stop_grace_period") is not None:
        out["stop_grace"] = _go_duration(body["stop_grace_period"], ctx, "stop_grace_period")
    if body.get("extra_hosts") is not None:
        out["extra_hosts"] = _extra_hosts(body["extra_hosts"], ctx)
    if body.get("security_opt") is not None:
        out.update(_security_opt(body["security_opt"], ctx))
    if body.get("userns_mode") is not None:
        if body["userns_mode"] != "host":
            raise ctx.error("userns_mode", f"'{str(body['userns_mode'])[:40]}' is not supported: every service "
                                           "has a user namespace of its own unless this says host")
        out["userns"] = "host"
    resources = _resources(body, ctx)
    if resources:
        out["resources"] = resources
    readiness = _healthcheck(body.get("healthcheck"), ctx)
    if readiness:
        out["readiness"] = readiness
    if body.get("depends_on") is not None:
        out["depends_on"] = _depends_on(body["depends_on"], ctx)
    if "listen" not in own or "port" not in own:
        out.update(_ports(body.get("ports"), own.get("port"), ctx.at))
    for k, v in own.items():  # activator's own keys win; its readiness and resources add to the derived ones
        if k in ("readiness", "resources") and isinstance(v, Mapping) and isinstance(out.get(k), Mapping):
            out[k] = {**out[k], **v}
        else:
            out[k] = v
    return out


def _go_duration(raw: Any, ctx: _Context, key: str) -> float:
    """Compose's durations (Go's: 1m30s, 500ms, 10s) -> seconds."""
    text = str(raw).strip()
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    parts = _GO_DURATION.findall(text)
    if not text or "".join(n + u for n, u in parts) != text:
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
    """The served services among depends_on (the others run under docker compose: nothing for us to wake)."""
    if isinstance(raw, (list, Mapping)):
        names = [str(n) for n in raw]
    else:
        raise ctx.error("depends_on", "expected a list or a mapping of service names")
    for n in names:
        if n not in ctx.served:
            ctx.note(f"depends_on.{n}", "not served by activator (it runs under docker compose); its instances "
                                        "are not woken with this one")
    return [n for n in names if n in ctx.served]


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
            if not isinstance(source, str) or not isinstance(target, str):
                raise ctx.error("volumes", "a volume needs source and target (anonymous volumes would be lost with "
                                           "their instance)")
        else:
            parts = str(v).split(":")
            if len(parts) < 2:
                raise ctx.error("volumes", f"'{v}' has no source: an anonymous volume would be lost with its "
                                           f"instance; name it (NAME:{v})")
            source, target = parts[0], parts[1]
            ro = len(parts) > 2 and "ro" in parts[2].split(",")
        if source.startswith((".", "~", "/")):
            if source.startswith("."):
                source = str((ctx.base / source).resolve())
            elif source.startswith("~"):
                source = str(Path(source).expanduser())
            out.append({"source": source, "target": target, "read_only": ro})
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
    for key, value in items:
        if isinstance(value, bool):
            raise ctx.error(f"environment.{key}", f"{str(value).lower()} is a boolean; Compose wants a string: "
                                                  f"quote it ('{str(value).lower()}')")
        if value is None:
            if key in ctx.env:
                out[key] = ctx.env[key]
            continue
        out[key] = str(value)
    return out


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
    """ports -> listen and port: every published TCP port of the one target port (x-activator's port, or the only
    one published); a second target port is refused (one app port per service)."""
    if raw is not None and not isinstance(raw, list):
        raise ConfigError(f"{at}.ports: expected a list")
    mappings = [_port(p, at) for p in (raw or [])]
    targets = sorted({m[2] for m in mappings})
    if wanted is None and len(targets) > 1:
        raise ConfigError(f"{at}.ports: these publish ports {', '.join(map(str, targets))} of the app, and activator "
                          f"serves one app port per service; keep one, or pick it with {MARK}: {{port: N}} and "
                          "split the others into their own service")
    target = wanted if wanted is not None else (targets[0] if targets else None)
    chosen = [m for m in mappings if m[2] == target]
    if not chosen:
        have = "no published port" if not mappings else f"no published port for port {target}"
        raise ConfigError(f"{at}.ports: {have}; publish one (\"8080:80\"), or set listen and port in {MARK}")
    others = sorted({m[2] for m in mappings} - {target})
    if others:
        raise ConfigError(f"{at}.ports: port {others[0]} is published too, and activator serves one app port per "
                          f"service (port: {target}); remove it or serve it as a service of its own")
    listen = [f"[{h}]:{p}" if ":" in h else f"{h}:{p}" for h, p, _ in chosen]
    return {"listen": listen if len(listen) > 1 else listen[0], "port": target}


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
