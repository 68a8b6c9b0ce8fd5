"""The Compose service keys: each one applied, ignored (with why, said by `activator validate`) or refused (with
why, in one line); tests/unit/test_compose_keys.py holds the table against the Compose specification's own key
list. And the applied keys that map one to one-ish: durations, resources, the healthcheck, depends_on,
extra_hosts, security_opt."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .composecontext import MARK, Context, is_set
from .units import parse_size

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
CONDITIONS = ("service_started", "service_healthy", "service_completed_successfully")
_GO_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
_GO_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def _go_parts(text: str) -> list[tuple[str, str]]:
    """Go's duration (1h2m3.5s, 500ms, 250us) as (number, unit) pairs; [] when it is not one."""
    parts: list[tuple[str, str]] = _GO_DURATION.findall(text)
    return parts if text and "".join(n + u for n, u in parts) == text else []


def go_duration(raw: Any, ctx: Context, key: str) -> float:
    """Compose's durations (Go's: 1m30s, 500ms, 10s) -> seconds."""
    if isinstance(raw, int | float) and not isinstance(raw, bool):
        return float(raw)
    text = str(raw).strip()
    parts = _go_parts(text)
    if not parts:
        raise ctx.error(key, f"'{text[:40]}' is not a duration (e.g. 10s, 1m30s, 500ms)")
    return sum(float(n) * _GO_UNITS[u] for n, u in parts)


def resources(body: Mapping[str, Any], ctx: Context) -> dict[str, Any]:
    """mem_limit, cpus, pids_limit and deploy.resources.limits -> resources (memory, cpus, pids)."""
    out: dict[str, Any] = {}
    deploy = body.get("deploy")
    if deploy is not None:
        if not isinstance(deploy, Mapping):
            raise ctx.error("deploy", "expected a mapping")
        for k, v in deploy.items():
            if k in DEPLOY_IGNORED:
                if is_set(v):
                    ctx.note(f"deploy.{k}", "swarm's business; activator scales on demand (x-activator: "
                                            "max_instances)" if k == "replicas" else "swarm's business")
            elif k != "resources" and not str(k).startswith("x-"):
                raise ctx.error(f"deploy.{str(k)[:40]}", "not a key of deploy")
        res = deploy.get("resources") or {}
        if not isinstance(res, Mapping) or set(res) - {"limits", "reservations"}:
            raise ctx.error("deploy.resources", "expected limits (and reservations)")
        if is_set(res.get("reservations")):
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


def _limit(kind: str, raw: Any, ctx: Context, key: str) -> Any:
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


def healthcheck(raw: Any, ctx: Context) -> dict[str, Any]:
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
    durations = {k: go_duration(raw[k], ctx, f"healthcheck.{k}") for k in
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


def depends_on(raw: Any, ctx: Context) -> list[str]:
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
        if is_set(spec.get("restart")):
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


def extra_hosts(raw: Any, ctx: Context) -> dict[str, str]:
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


def security_opt(raw: Any, ctx: Context) -> dict[str, Any]:
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
