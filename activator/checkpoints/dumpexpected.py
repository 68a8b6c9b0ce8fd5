"""What a template of a service, dumped on this host, would hold (Expected), the bounds a hostile image is held to,
and the one line a dump that differs is refused with (Refuse: `service 'S': checkpoint refused: IMAGE: FIELD:
why`). The other dump*.py modules check one concern each against it."""

from __future__ import annotations

import os
import resource
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activator.errors import ActivatorError
from activator.runtime.seccompref import Filter
from activator.runtime.spec import ProcessSpec
from activator.runtime.userns import IdMap


class DumpError(ActivatorError):
    """A checkpoint's CRIU images hold something this host would not have dumped for the service."""


# Bounds: a hostile image must not exhaust memory or time before it is refused.
#: a decoded (protobuf) image larger than this is not one CRIU wrote for a container of ours
MAX_IMAGE = 8 * 2**20
#: image files in a dump; tasks; threads in all; seccomp filters in all; files; mounts
MAX_FILES, MAX_TASKS, MAX_THREADS, MAX_FILTERS, MAX_MOUNTS = 65536, 4096, 32768, 256, 256
MAX_BPF = 4096 * 8  # BPF_MAXINSNS sock_filters
#: ids a container's processes may hold (the namespace's, for `userns: host` the image's)
ID_RANGE = 65536
MAX_GROUPS = 65536
#: capability numbers (linux/capability.h)
CAPS = ("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
        "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
        "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
        "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
        "CHECKPOINT_RESTORE")
CAP_BITS = {f"CAP_{n}": i for i, n in enumerate(CAPS)}


def cap_mask(names: Iterable[str]) -> int:
    return sum(1 << CAP_BITS[n] for n in set(names))


def cap_names(mask: int) -> list[str]:
    return [f"CAP_{CAPS[i]}" if i < len(CAPS) else f"bit {i}" for i in range(64) if mask >> i & 1]


#: one cgroup path segment of a unit's slice: no "." or ".." (it may not start with a dot)
_SEGMENT = r"[A-Za-z0-9_@:-][A-Za-z0-9_.@:-]*"


@dataclass(frozen=True)
class Expected:
    """What a template of the service, dumped on this host, would hold.

    capabilities: the service's set (spec.capability_set(cap_add, cap_drop)); process: the spec the host
    derives (uid, gid, additional gids, tmpfs, read_only); seccomp: seccompref.reference() of the filter it
    runs under (the programs runc may install for it: every task's oldest filter must be one), () for
    `seccomp: unconfined`; external: extmounts.mounts(); volumes: the service's volume
    destinations (bind mounts runc dumps as external, keyed by destination); rlimits: the hard limit of every
    resource a template may have (this host's own, narrowed by the service's ulimits); loginuid and
    oom_score_adj: what a template inherits here; nice: the lowest nice value it may have."""

    service: str
    idmap: IdMap | None
    capabilities: frozenset[str]
    process: ProcessSpec
    seccomp: tuple[Filter, ...]
    external: dict[str, str]
    volumes: tuple[str, ...] = ()
    rlimits: tuple[int, ...] = ()
    loginuid: frozenset[int] = frozenset({0xFFFFFFFF})
    oom_score_adj: int = 0
    nice: int = 0
    #: where a template's cgroup may sit: /activator, or `instances` below a systemd service's own cgroup (the
    #: dumping daemon ran as a unit: cgroups.use_unit_cgroup), whatever the unit's slice
    cgroup_parent: str = rf"activator|(?:{_SEGMENT}/)*{_SEGMENT}\.service/instances"
    extra_files: frozenset[str] = field(default_factory=frozenset)  # image kinds allowed beyond KINDS (tests)
    # an import's cgroup.img has had its hierarchy roots removed (strip_cgroup_roots) before the check, so any
    # root left is refused; a local dump may hold this host's own (False)
    roots_stripped: bool = True


def host_limits(process: ProcessSpec) -> dict[str, Any]:
    """Blocking (reads /proc/self). The rlimits, loginuid, oom_score_adj and nice a template started by this
    process would inherit: Expected's keyword arguments."""
    from activator.config.process import ULIMITS

    hard = [resource.getrlimit(i)[1] for i in range(16)]
    hard = [(1 << 64) - 1 if h == resource.RLIM_INFINITY else h for h in hard]
    for name, _soft, h in process.rlimits:
        idx = getattr(resource, str(ULIMITS.get(name, "")), None)
        if isinstance(idx, int) and 0 <= idx < 16:
            hard[idx] = h if h >= 0 else (1 << 64) - 1
    out: dict[str, Any] = {"rlimits": tuple(hard), "nice": os.getpriority(os.PRIO_PROCESS, 0)}
    uids = {0xFFFFFFFF}
    try:
        uids.add(int(Path("/proc/self/loginuid").read_text()))
        out["oom_score_adj"] = int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        pass
    out["loginuid"] = frozenset(uids)
    return out


def as_int(v: Any) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return int(v, 0)
    raise ValueError(f"not a number: {v!r}")


class Refuse:
    """Builds the one line: `dump refused: IMAGE: FIELD: why`."""

    def __init__(self, expected: Expected) -> None:
        self.svc = expected.service
        self.current = "dump"  # the image being read: a malformed field anywhere in it is named by it

    def __call__(self, image: str, what: str, why: str) -> DumpError:
        return DumpError(f"service '{self.svc}': checkpoint refused: {image}: {what}: {why}")


def entries_of(docs: dict[str, Any], name: str, refuse: Refuse) -> list[dict[str, Any]]:
    refuse.current = name
    doc = docs.get(name)
    if doc is None:
        raise refuse(name, "file", "missing")
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise refuse(name, "entries", "not a list of entries")
    return entries


def one_of(docs: dict[str, Any], name: str, refuse: Refuse) -> dict[str, Any]:
    entries = entries_of(docs, name, refuse)
    if len(entries) != 1:
        raise refuse(name, "entries", f"{len(entries)} entries (expected 1)")
    return entries[0]
