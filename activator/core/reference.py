"""The configuration reference (docs/configuration.md), rendered from the declarations in config/ (each key's
kind describes itself) and what core/reloadplan.py lets a reload change: every key's type, default, range, an
example, and what a change to it takes (a reload, a reload that rebuilds the checkpoint, or a restart).
`activator schema --markdown` prints it; tests/unit/test_config_reference.py fails when the checked-in copy is
stale.

Pure: the text is returned, nothing is written.
"""

from __future__ import annotations

from dataclasses import MISSING, Field, fields
from typing import Any

from activator.config.declare import Section
from activator.config.kinds import Kind
from activator.config.service import ServiceConfig
from activator.config.settings import Settings

from .reloadplan import RELOADABLE_SETTINGS

#: one example value per key, as written after `key: ` (the unit test parses each in a file of its own)
EXAMPLES: dict[str, str] = {
    "settings.state_dir": "/srv/activator",
    "settings.metrics": "127.0.0.1:9100",
    "settings.drain_timeout": "30s",
    "settings.runc": "/usr/local/sbin/runc",
    "settings.criu": "/usr/local/sbin/criu",
    "settings.images": "{engine: podman}",
    "settings.images.engine": "podman",
    "settings.images.socket": "/run/podman/podman.sock",
    "settings.network": "{bridge: act1, subnet: 10.90.0.0/24}",
    "settings.network.bridge": "act1",
    "settings.network.subnet": "192.168.250.0/24",
    "settings.checkpoint_registry": "{repository: registry.example:5000/activator, push: false}",
    "settings.checkpoint_registry.repository": "registry.example:5000/activator",
    "settings.checkpoint_registry.tls_verify": "false",
    "settings.checkpoint_registry.auth_file": "/root/.config/containers/auth.json",
    "settings.checkpoint_registry.pull": "false",
    "settings.checkpoint_registry.push": "false",
    "settings.checkpoint_registry.timeout": "10m",
    "settings.agent": "{listen: 127.0.0.1:9465}",
    "settings.agent.listen": "10.0.0.5:9465",
    "settings.agent.drain_notice": "5s",
    "settings.checkpoint_trust": "{keys: [/etc/activator/builder.pub]}",
    "settings.checkpoint_trust.keys": "[/etc/activator/builder.pub]",
    "settings.checkpoint_trust.sign_key": "/etc/activator/builder.key",
    "settings.checkpoint_trust.insecure_unsigned": "true",
    "image": "nginx:1.25",
    "listen": "127.0.0.1:8080",
    "port": "80",
    "protocol": "[tcp, udp]",
    "udp_flow_timeout": "2m",
    "udp_queue": "256",
    "udp_held_bytes": "16m",
    "udp_reply_ratio": "10",
    "command": '[httpd, -f, -p, "8080"]',
    "entrypoint": "/docker-entrypoint.sh",
    "environment": "{JAVA_OPTS: -Xmx256m}",
    "working_dir": "/app",
    "user": '"1000:1000"',
    "seccomp": "/etc/activator/profile.json",
    "network": "none",
    "egress": "false",
    "userns": "host",
    "cap_add": "[SYS_PTRACE]",
    "cap_drop": "[ALL]",
    "extra_hosts": "{db.internal: 10.0.0.7}",
    "hostname": "web1",
    "read_only": "true",
    "tmpfs": '["/tmp:size=64m"]',
    "ulimits": "{nofile: {soft: 1024, hard: 4096}}",
    "depends_on": "[db]",
    "volumes": '["data:/var/lib/app", "/srv/site:/usr/share/html:ro"]',
    "share_memory": "true",
    "restore_memory": "map",
    "stateful": "true",
    "readiness": "{http_path: /health, timeout: 2m}",
    "readiness.timeout": "2m",
    "readiness.http_path": "/health",
    "readiness.command": "[pg_isready, -q, -h, /tmp]",
    "readiness.command_timeout": "5s",
    "warmup": "{http_paths: [/], count: 2000}",
    "warmup.http_paths": "[/, /api/status]",
    "warmup.payload": '"PING\\r\\n"',
    "warmup.count": "2000",
    "idle_timeout": "30m",
    "idle_cpu_below": "2%",
    "probes": "[{http: /healthz, from: [10.0.0.0/8]}]",
    "pre_stop": "{http_path: /admin/flush}",
    "pre_stop.http_path": "/admin/flush",
    "pre_stop.method": "PUT",
    "pre_stop.timeout": "30s",
    "keep_alive_schedule": '["mon-fri 08:00-18:00"]',
    "restore_timeout": "30s",
    "connect_timeout": "15s",
    "resources": "{memory: 512m, cpus: 1.5}",
    "resources.memory": "512m",
    "resources.cpus": "0.5",
    "resources.pids": "256",
    "min_instances": "1",
    "prepared_slots": "2",
    "standby": "1",
    "max_instances": "4",
    "target_connections": "50",
    "max_connections": "5000",
    "max_waiting": "100",
    "backoff": "{initial: 2s, max: 5m}",
    "backoff.initial": "2s",
    "backoff.max": "5m",
    "fallback": "none",
    "refuse_with": "http-503",
    "http": "true",
    "waiting_page": "2s",
    "proxy_protocol": "v2",
    "handoff": "true",
    "wake_on": "connect",
    "wake_grace": "2s",
    "client_idle_timeout": "1h",
    "client_silent_timeout": "10s",
    "stop_signal": "SIGQUIT",
    "stop_grace": "30s",
}

RELOAD = "reload"
REBUILD = "reload; rebuilds the checkpoint"
RESTART = "restart"

_CHANGES = {
    RELOAD: "a reload (`systemctl reload activator`, `activator reload` or SIGHUP); the service's new instances "
            "use it, running ones finish their connections on the old definition",
    REBUILD: "a reload; the service's checkpoint is rebuilt (it shapes the checkpointed process), then new "
             "instances use it and running ones finish their connections on the old one",
    RESTART: "a restart of the daemon (`systemctl restart activator`): a reload that changes it is refused as a "
             "whole",
}


def declared(cls: type, at: str = "") -> list[tuple[str, Field[Any]]]:
    """(dotted path, field) of every key of cls and its sections, in declaration order."""
    out: list[tuple[str, Field[Any]]] = []
    for f in fields(cls):
        if "kind" not in f.metadata:
            continue
        out.append((at + f.name, f))
        if isinstance(f.metadata["kind"], Section):
            out += declared(f.metadata["kind"].cls, f"{at}{f.name}.")
    return out


def every_key() -> list[str]:
    """Every key's path as EXAMPLES names it (settings.X..., or a service's X...)."""
    return [p for p, _ in declared(Settings, "settings.")] + [p for p, _ in declared(ServiceConfig)]


def change(path: str, f: Field[Any]) -> str:
    """What a change to this key takes."""
    if path.startswith("settings."):
        return RELOAD if path.removeprefix("settings.").split(".")[0] in RELOADABLE_SETTINGS else RESTART
    if isinstance(f.metadata["kind"], Section) and any(g.metadata["shapes"]
                                                       for _, g in declared(f.metadata["kind"].cls)):
        return "as its keys say"
    if path == "probes":  # only their http paths shape it (probes.probe_paths): who probes does not
        return "reload; rebuilds the checkpoint if an http path changes"
    return REBUILD if f.metadata["shapes"] else RELOAD


def default(f: Field[Any]) -> str:
    kind: Kind = f.metadata["kind"]
    if f.default is MISSING:
        return "(its keys' defaults)" if f.default_factory is not MISSING else "required"
    v = f.default
    if v is None:
        return "null"
    if isinstance(v, bool):
        return str(v).lower()
    return kind.show(v)


def _shown(text: str) -> str:
    """A default as a value in code, or words about it as words."""
    return text if text.startswith("(") or text == "required" else f"`{text}`"


def _anchor(heading: str) -> str:
    """The id GitHub gives a heading: lower case, punctuation but '-' and '_' dropped."""
    return "".join(c for c in heading.lower() if c.isalnum() or c in "-_")


def markdown() -> str:
    out = [
        "# Configuration reference",
        "",
        "<!-- Generated by `activator schema --markdown` from activator/config/model.py; do not edit by hand:",
        "     tests/unit/test_config_reference.py fails when this copy is stale. -->",
        "",
        "A services file has two top-level keys: `settings:` (the daemon's own, optional) and `services:` (a mapping",
        "of service names to definitions; names are 1-40 of a-z, 0-9, `_` and `-`, starting with a letter or digit).",
        "A Compose file with an `x-activator:` block per service is read too (docs/compose.md).",
        "",
        "```yaml",
        "settings:",
        "  state_dir: /var/lib/activator     # the default",
        "services:",
        "  web:",
        "    image: nginx:1.25               # required",
        "    listen: 127.0.0.1:8080          # required",
        "    port: 80                        # required",
        "    idle_timeout: 5m                # the default",
        "```",
        "",
        "How values are written:",
        "",
        "- **durations**: seconds (a number), or with a unit: `250ms`, `5s`, `2m`, `1h`, `1d`, or several as Compose",
        "  writes them, `1m30s`;",
        "- **sizes**: bytes (a number), or with `k`, `m`, `g` (binary: `512m` is 512 MiB);",
        "- **addresses**: `HOST:PORT` with an IP address (`127.0.0.1:8080`, `[::1]:8080`); a port alone (`8080`,",
        "  `:8080`) listens on every interface of the host (`0.0.0.0:8080`), as Docker's `-p 8080:80` publishes, and",
        "  `activator validate` says so;",
        "- **null** turns off what a key with a null default would do, or restores the default meaning its",
        "  description gives.",
        "",
        "What a change takes (the last line of each key):",
        "",
        *(f"- **{name}**: {text}." for name, text in _CHANGES.items()),
        "",
        "`activator validate FILE` checks a file as `activator run` would at start and lists every problem, one per",
        "line; with a daemon running, it also says what a reload of the file would change.",
        "",
    ]
    for title, prefix, cls, at in (("`settings:`", "settings.", Settings, "settings."),
                                   ("`services.NAME:`", "services.NAME.", ServiceConfig, "")):
        keys = declared(cls, at)
        out += [f"## {title}", "", "| key | type | default | a change takes |", "|---|---|---|---|"]
        for path, f in keys:
            shown = path if at else prefix + path
            out.append(f"| [`{shown}`](#{_anchor(shown)}) | {f.metadata['kind'].describe()[0].split(' (')[0]}"
                       f"{' or null' if f.metadata['nullable'] else ''} | {_shown(default(f))} | {change(path, f)} |")
        out.append("")
        for path, f in keys:
            shown = path if at else prefix + path
            kind = f.metadata["kind"]
            typ, rng = kind.describe()
            if f.metadata["nullable"]:
                typ += ", or null"
            doc = f.metadata["doc"]
            out += [f"### `{shown}`", "", doc[0].upper() + doc[1:] + ("" if doc.endswith(".") else "."), "",
                    f"- type: {typ}", f"- default: {_shown(default(f))}", f"- range: {rng}",
                    f"- example: `{path.rsplit('.', 1)[-1]}: {EXAMPLES[path]}`",
                    f"- a change takes: {change(path, f)}", ""]
    return "\n".join(out).rstrip("\n") + "\n"
