"""The OCI runtime spec for one instance (pure: paths in, a dict out).

The sandbox is Docker's default one (moby oci/defaults.go, 20.10) made tighter: its capability set less
CAP_NET_RAW (as Podman's default set), its masked and read-only paths plus /sys/devices/virtual/powercap (masked
by newer Docker: RAPL energy counters are a side channel), mount options, device allowlist (runc adds the same
default devices), PID/IPC/UTS/mount/network namespaces, Docker's default seccomp profile (seccomp.py), and
no_new_privs, which `docker run` does not set. With a user namespace (the default: userns.py), uid 0 in a
container is an unprivileged uid on the host, as with Docker's userns-remap; the network namespace stays one we
made outside it (it is prepared ahead), so root in the instance holds no capability over its own network (it
cannot change addresses, routes or firewall rules; ports below 1024 are open to it through the namespace's
ip_unprivileged_port_start, as Docker sets it).

Why no CAP_NET_RAW: on a host shared by strangers, raw sockets are how an instance forges frames (another
instance's address, a packet to the host's 127.0.0.1). The network guards stop those frames anyway
(network.py), so this is depth, and it costs little: ping works without it (ping_group_range is open in each
instance's namespace, as Docker sets it), and a service that needs raw sockets says `cap_add: [NET_RAW]`.

The template that gets checkpointed and every instance restored from it use the same spec except for the
root filesystem, the network namespace path and the cgroup path. Giving runc a network namespace *path* has a
useful side effect: runc marks that namespace external when it dumps, and on restore it joins whatever path the
new spec names. Each instance therefore lands in a namespace we made (with lo already up), and no veth or
address is needed: the proxy opens its backend sockets inside that namespace and dials 127.0.0.1.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .userns import IdMap
    from .volumes import Bind

from activator.config.process import ULIMITS

# Docker's default capability set less CAP_NET_RAW: apps written for Docker expect these.
from activator.config.sections import Resources

# Docker's default capability set less CAP_NET_RAW: apps written for Docker expect these.
DEFAULT_CAPS = (
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_SETGID",
    "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE", "CAP_SYS_CHROOT", "CAP_KILL",
    "CAP_AUDIT_WRITE",
)

MASKED_PATHS = [
    "/proc/acpi", "/proc/asound", "/proc/kcore", "/proc/keys", "/proc/latency_stats", "/proc/timer_list",
    "/proc/timer_stats", "/proc/sched_debug", "/sys/firmware", "/proc/scsi", "/sys/devices/virtual/powercap",
]
READONLY_PATHS = ["/proc/bus", "/proc/fs", "/proc/irq", "/proc/sys", "/proc/sysrq-trigger"]

CPU_PERIOD_US = 100_000


@dataclass(frozen=True)
class ProcessSpec:
    """What to execute and the container it sees, after the image config and the service's overrides are merged:
    the template's, kept in its checkpoint, so every instance (and a cold start) gets the same."""

    args: tuple[str, ...]
    env: tuple[str, ...]
    cwd: str
    uid: int
    gid: int
    additional_gids: tuple[int, ...] = ()
    capabilities: tuple[str, ...] = DEFAULT_CAPS
    rlimits: tuple[tuple[str, int, int], ...] = ()  # (Docker's name, soft, hard)
    read_only: bool = False  # the root filesystem
    tmpfs: tuple[tuple[str, tuple[str, ...]], ...] = ()  # (target, mount options)


def capability_set(add: tuple[str, ...], drop: tuple[str, ...]) -> tuple[str, ...]:
    """The default set with a service's cap_add and cap_drop (names without CAP_; drop may be ALL), as Docker
    applies them: drops first, then adds."""
    caps = set() if "ALL" in drop else set(DEFAULT_CAPS) - {f"CAP_{c}" for c in drop}
    return tuple(sorted(caps | {f"CAP_{c}" for c in add}))


def merge_env(image_env: tuple[str, ...], overrides: tuple[tuple[str, str], ...], hostname: str) -> tuple[str, ...]:
    env: dict[str, str] = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"}
    for item in image_env:
        k, _, v = item.partition("=")
        env[k] = v
    env["HOSTNAME"] = hostname
    env.update(dict(overrides))
    return tuple(f"{k}={v}" for k, v in env.items())


def process_args(
    image_entrypoint: tuple[str, ...], image_cmd: tuple[str, ...],
    entrypoint: tuple[str, ...] | None, command: tuple[str, ...] | None,
) -> tuple[str, ...]:
    """Docker's rules: an overridden entrypoint drops the image's Cmd unless a command is given too."""
    ep = image_entrypoint if entrypoint is None else entrypoint
    if command is not None:
        cmd = command
    elif entrypoint is not None:
        cmd = ()
    else:
        cmd = image_cmd
    return tuple(ep) + tuple(cmd)


def _resources(res: Resources) -> dict[str, Any]:
    out: dict[str, Any] = {"devices": [{"allow": False, "access": "rwm"}]}
    if res.memory is not None:
        out["memory"] = {"limit": res.memory, "swap": res.memory}
    if res.cpus is not None:
        out["cpu"] = {"quota": int(res.cpus * CPU_PERIOD_US), "period": CPU_PERIOD_US}
    if res.pids is not None:
        out["pids"] = {"limit": res.pids}
    return out


def runtime_spec(
    process: ProcessSpec, *, rootfs: str, netns_path: str, cgroups_path: str, hostname: str, resources: Resources,
    criu_config: str | None = None, seccomp: dict[str, Any] | None = None, binds: tuple[Bind, ...] = (),
    idmap: IdMap | None = None, userns_path: str | None = None, sysfs: str | None = None,
) -> dict[str, Any]:
    """sysfs: a sysfs of the instance's network namespace to bind on /sys, for an app in a user namespace (which
    may not mount one: the network namespace is not its own, netns.NetNamespace.mount_sysfs). userns_path: the
    user namespace to join (a template's, made with its network namespace) rather than one runc makes."""
    linux: dict[str, Any] = {
        "namespaces": [
            {"type": "pid"}, {"type": "ipc"}, {"type": "uts"}, {"type": "mount"},
            {"type": "network", "path": netns_path},
            *([{"type": "user"} | ({"path": userns_path} if userns_path else {})] if idmap is not None else []),
        ],
        "cgroupsPath": cgroups_path,
        "resources": _resources(resources),
        "maskedPaths": MASKED_PATHS,
        "readonlyPaths": READONLY_PATHS,
    }
    if idmap is not None:
        linux["uidMappings"] = linux["gidMappings"] = idmap.oci()
    if seccomp is not None:
        linux["seccomp"] = seccomp
    return {
        "ociVersion": "1.0.2",
        # runc passes this file to CRIU on checkpoint and restore (instead of /etc/criu/runc.conf).
        "annotations": {"org.criu.config": criu_config} if criu_config else {},
        "process": {
            "terminal": False,
            "user": {"uid": process.uid, "gid": process.gid, "additionalGids": list(process.additional_gids)},
            "args": list(process.args),
            "env": list(process.env),
            "cwd": process.cwd,
            "capabilities": {k: list(process.capabilities) for k in ("bounding", "effective", "permitted")},
            "noNewPrivileges": True,
            "rlimits": [{"type": ULIMITS[name], "soft": soft, "hard": hard} for name, soft, hard in process.rlimits],
        },
        "root": {"path": rootfs, "readonly": process.read_only},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc", "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs",
             "options": ["nosuid", "strictatime", "mode=755", "size=65536k"]},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts",
             "options": ["nosuid", "noexec", "newinstance", "ptmxmode=0666", "mode=0620", "gid=5"]},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm",
             "options": ["nosuid", "noexec", "nodev", "mode=1777", "size=65536k"]},
            {"destination": "/dev/mqueue", "type": "mqueue", "source": "mqueue",
             "options": ["nosuid", "noexec", "nodev"]},
            {"destination": "/sys", "type": "sysfs", "source": "sysfs", "options": ["nosuid", "noexec", "nodev", "ro"]}
            if sysfs is None else
            {"destination": "/sys", "type": "bind", "source": sysfs, "options": ["rbind", "nosuid", "noexec", "nodev",
                                                                                 "ro"]},
            # volumes: runc marks bind mounts external in a dump (keyed by destination), and maps them back
            *({"destination": b.target, "type": "bind", "source": str(b.host),
               "options": ["rbind", "ro" if b.read_only else "rw"]} for b in binds),
            # CRIU dumps these with their contents: what the app wrote there before the dump, every instance has
            *({"destination": target, "type": "tmpfs", "source": "tmpfs", "options": list(options)}
              for target, options in process.tmpfs),
        ],
        "linux": linux,
    }
