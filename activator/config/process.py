"""What the app's process is given: its environment, its capabilities and its resource limits (ulimits), as
the kinds of the keys that say so.

Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .kinds import Kind
from .units import show as _show

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

    def describe(self) -> tuple[str, str]:
        return "mapping {NAME: value}, or a list of NAME=value", "names like [A-Za-z_][A-Za-z0-9_]*, no NUL in values"

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "object", "propertyNames": {"pattern": f"^{_ENV_NAME}$"}},
                          {"type": "array", "items": {"type": "string", "pattern": f"^{_ENV_NAME}="}}]}


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

    def describe(self) -> tuple[str, str]:
        return "list of capability names", "Linux capabilities (NET_RAW or CAP_NET_RAW, any case)" + (
            ", or [ALL]" if self.all_ok else "")

    def schema(self) -> dict[str, Any]:
        names = [*CAPABILITIES, *(("ALL",) if self.all_ok else ())]
        return {"type": "array", "items": {"type": "string", "enum": names + [f"CAP_{n}" for n in names]}}


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

    def describe(self) -> tuple[str, str]:
        return "mapping {name: N} or {name: {soft: N, hard: N}}", ", ".join(ULIMITS) + "; -1: unlimited"

    def schema(self) -> dict[str, Any]:
        n = {"type": "integer", "minimum": -1}
        return {"type": "object", "propertyNames": {"enum": list(ULIMITS)}, "additionalProperties": {"oneOf": [
            n, {"type": "object", "required": ["soft", "hard"], "additionalProperties": False,
                "properties": {"soft": n, "hard": n}}]}}
