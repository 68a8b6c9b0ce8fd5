"""An instance's cgroups (PARENT/NAME in every hierarchy, v1 or v2): made by runc for containers it runs, or
here (create()) for instances restored through CRIU directly; removed here even when runc cannot.

Both kinds of host are first class. A v1 (or hybrid) host has one directory per hierarchy and device rules as
devices.allow lines; a pure v2 host (/sys/fs/cgroup is cgroup2, the default of Debian 12, Ubuntu 22.04+, Fedora,
RHEL 9) has one directory whose controllers its parent enables in cgroup.subtree_control, and device rules as a BPF
program (devicefilter.py), both made here as runc would make them.

PARENT is /activator, or, when activator runs as a systemd service (Delegate=yes), `instances` below the unit's
own cgroup (use_unit_cgroup()): then `systemctl status` counts the instances and stopping the unit can never leave
one running (systemd kills what is left in its cgroup). Leftovers are looked for in both places.

`runc delete` removes them when runc knows the container. When it does not (runc was killed during a restore
that ran past restore_timeout, or a crash came between runc creating the cgroups and recording the container),
they are left behind, possibly with a half-restored process inside. remove() kills what is in them and
removes the directories.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

from . import devicefilter

ROOT = Path("/sys/fs/cgroup")
LEGACY = "activator"
PARENT = LEGACY  # changed once at start by use_unit_cgroup()
#: runc's device rules for a container (its default devices; everything else may be created but not opened),
#: read back from a runc-made cgroup's devices.list. The spec's own rule denies everything first.
DEVICE_RULES = ("b *:* m", "c *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm",
                "c 5:0 rwm", "c 5:2 rwm", "c 10:200 rwm", "c 136:* rwm")
#: The same rules as a v2 device program's (devicefilter.py).
DEVICE_FILTER = tuple(devicefilter.Rule.parse(r) for r in DEVICE_RULES)
CPU_PERIOD_US = 100_000
#: The v2 controllers an instance's limits and accounting need, enabled from the root down to PARENT.
V2_CONTROLLERS = ("cpu", "memory", "pids")
#: Where the daemon itself moves on a v2 host when it runs as a systemd service: a cgroup whose children have
#: controllers may hold no process ("no internal processes"), so the unit's own cgroup must be left empty.
DAEMON_LEAF = "daemon"


def v1_devices() -> bool:
    """Cgroup v1 (or hybrid) with a devices controller: device rules are files to write."""
    return (ROOT / "devices" / "devices.allow").exists()


def unified() -> bool:
    """A pure cgroup v2 host: /sys/fs/cgroup is itself the v2 hierarchy (a hybrid mounts it at unified/)."""
    return (ROOT / "cgroup.controllers").exists()


def version() -> str:
    return "v2" if unified() and not v1_devices() else "v1"


@functools.cache
def _device_programs() -> bool:
    return devicefilter.supported()


def direct() -> bool:
    """Whether an instance's cgroups can be made here, with runc's device rules, for a restore through CRIU
    directly (criurestore.py) and a handoff: device files on v1 or a hybrid, a device program on v2 (a kernel
    without CONFIG_CGROUP_BPF cannot, and then instances are restored through `runc restore`)."""
    return v1_devices() or (unified() and _device_programs())


def use_unit_cgroup(proc_cgroup: Path = Path("/proc/self/cgroup")) -> str | None:
    """Put instance cgroups under the systemd service's own cgroup, if this process is one (INVOCATION_ID is set
    and its cgroup is a .service). On a pure v2 host the daemon first moves into a leaf of its own (DAEMON_LEAF;
    "no internal processes") and enables the controllers below the unit, which Delegate=yes lets it do.
    Returns the parent now used, or None."""
    global PARENT
    if not os.environ.get("INVOCATION_ID"):
        return None
    lines = dict(line.split(":", 2)[1:] for line in proc_cgroup.read_text().splitlines() if line.count(":") >= 2)
    if unified():
        own = lines.get("", "").strip("/").removesuffix(f"/{DAEMON_LEAF}")
        if not own.endswith(".service"):
            return None
        unit = ROOT / own
        leaf = unit / DAEMON_LEAF
        leaf.mkdir(exist_ok=True)
        # Everything systemd started in the unit's cgroup (this process, and what it forked before now) moves.
        for pid in (unit / "cgroup.procs").read_text().split():
            with contextlib.suppress(ProcessLookupError):
                (leaf / "cgroup.procs").write_text(pid)
        _enable_controllers(unit)
    elif v1_devices():
        own = (lines.get("name=systemd") or lines.get("") or "").strip("/")
        if not own.endswith(".service"):
            return None
    else:
        return None
    PARENT = f"{own}/instances"
    return PARENT


def _enable_controllers(parent: Path) -> None:
    """v2: turn V2_CONTROLLERS on in cgroup.subtree_control from the root down to parent, where they are available
    and not on yet (on a systemd host they are, down to a delegated unit; /activator is ours)."""
    chain = [ROOT, *(ROOT / Path(*parent.relative_to(ROOT).parts[:i + 1])
                     for i in range(len(parent.relative_to(ROOT).parts)))]
    for cg in chain:
        have = set((cg / "cgroup.controllers").read_text().split())
        on = set((cg / "cgroup.subtree_control").read_text().split())
        missing = [c for c in V2_CONTROLLERS if c in have and c not in on]
        if missing:
            (cg / "cgroup.subtree_control").write_text(" ".join(f"+{c}" for c in missing))


def _fill_cpuset(hierarchy: Path, parent: Path) -> None:
    """A v1 cpuset takes no task until it has cpus and mems: fill every level from the root down to parent."""
    above = hierarchy
    for part in parent.relative_to(hierarchy).parts:
        here = above / part
        for f in ("cpuset.cpus", "cpuset.mems"):
            if not (here / f).read_text().strip():
                (here / f).write_text((above / f).read_text())
        above = here


def hierarchies() -> list[Path]:
    """The mounted hierarchies (a directory under /sys/fs/cgroup may be a bare one: systemd in a container makes
    `cpu,cpuacct` next to separately mounted cpu and cpuacct). A pure v2 host has one, the root itself."""
    if unified():
        return [ROOT]
    return sorted(p for p in ROOT.iterdir() if p.is_dir() and not p.is_symlink() and (p / "cgroup.procs").exists())


def create(name: str, memory: int | None, cpus: float | None, pids: int | None) -> list[Path]:
    """Blocking. PARENT/NAME in every hierarchy, as runc would make it for a container with these limits;
    returns the cgroup.procs files to put a process into. Only where direct() says it can."""
    if unified():
        return [_create_v2(name, memory, cpus, pids)]
    made: list[Path] = []
    try:
        for hierarchy in hierarchies():
            parent = hierarchy / PARENT
            parent.mkdir(parents=True, exist_ok=True)
            cg = parent / name
            cg.mkdir(exist_ok=True)  # co-mounted controllers (cpu,cpuacct) show one directory twice
            made.append(cg)
            kind = hierarchy.name
            if kind == "cpuset":  # a v1 cpuset takes no task until it has cpus and mems of its own
                _fill_cpuset(hierarchy, parent)
                for f in ("cpuset.cpus", "cpuset.mems"):
                    (cg / f).write_text((parent / f).read_text())
            elif kind == "devices":
                (cg / "devices.deny").write_text("a")
                for rule in DEVICE_RULES:
                    (cg / "devices.allow").write_text(rule)
            elif kind == "memory" and memory is not None:
                (cg / "memory.limit_in_bytes").write_text(str(memory))
                if (cg / "memory.memsw.limit_in_bytes").exists():
                    (cg / "memory.memsw.limit_in_bytes").write_text(str(memory))
            elif kind in ("cpu", "cpu,cpuacct") and cpus is not None:
                (cg / "cpu.cfs_period_us").write_text(str(CPU_PERIOD_US))
                (cg / "cpu.cfs_quota_us").write_text(str(int(cpus * CPU_PERIOD_US)))
            elif kind == "pids" and pids is not None:
                (cg / "pids.max").write_text(str(pids))
    except OSError:
        remove(name)
        raise
    return [cg / "cgroup.procs" for cg in made]


def _create_v2(name: str, memory: int | None, cpus: float | None, pids: int | None) -> Path:
    """runc's v2 cgroup for these limits (memory.max with no swap beyond it, as runc's memory == memory+swap
    gives; cpu.max; pids.max) and its device program."""
    cg = ROOT / PARENT / name
    try:
        cg.parent.mkdir(parents=True, exist_ok=True)
        _enable_controllers(cg.parent)
        cg.mkdir(exist_ok=True)
        if memory is not None:
            (cg / "memory.max").write_text(str(memory))
            if (cg / "memory.swap.max").exists():
                (cg / "memory.swap.max").write_text("0")
        if cpus is not None:
            (cg / "cpu.max").write_text(f"{int(cpus * CPU_PERIOD_US)} {CPU_PERIOD_US}")
        if pids is not None:
            (cg / "pids.max").write_text(str(pids))
        devicefilter.attach(cg, DEVICE_FILTER)
    except OSError:
        remove(name)
        raise
    return cg / "cgroup.procs"


def join(procs: list[Path], pid: int) -> None:
    """Blocking. Move pid into these cgroups (everything it forks from then on starts in them)."""
    for p in procs:
        p.write_text(str(pid))


def paths(name: str) -> list[Path]:
    """Every existing cgroup directory of this instance (v1: one per hierarchy; v2: one)."""
    found: list[Path] = []
    v2 = unified()
    for parent in dict.fromkeys((PARENT, LEGACY)):  # a run before an upgrade, or outside systemd, used /activator
        found += [] if v2 else [p for p in ROOT.glob(f"*/{parent}/{name}") if p.is_dir()]
        single = ROOT / parent / name
        found += [single] if single.is_dir() else []
    return found


@dataclass(frozen=True)
class Freezer:
    """An instance's freezer cgroup: while frozen its processes get no CPU and none of their timers fire; thawed,
    they go on from where they were (a restored app cannot tell, but for the clock)."""

    control: Path  # v1 freezer.state, v2 cgroup.freeze
    on: str
    off: str
    events: Path  # says when every task is frozen: v1 freezer.state (FREEZING, then FROZEN), v2 cgroup.events

    def freeze(self, timeout: float = 2.0) -> None:
        """Blocking; returns once every process is frozen. Raises OSError if that does not happen in time."""
        self.control.write_text(self.on)
        deadline = time.monotonic() + timeout
        while not self.frozen():
            if time.monotonic() > deadline:
                raise OSError(f"{self.control.parent.name} did not freeze within {timeout:g}s")
            time.sleep(0.001)

    def thaw(self) -> None:
        """One write (it is on a connection's path): the processes run again at once."""
        self.control.write_text(self.off)

    def frozen(self) -> bool:
        text = self.events.read_text()
        return text.strip() == "FROZEN" if self.events == self.control else "frozen 1" in text.splitlines()


def freezer(name: str) -> Freezer | None:
    """The instance's freezer (v1 or v2), or None if it has none."""
    for cg in paths(name):
        if (cg / "freezer.state").exists():
            return Freezer(cg / "freezer.state", "FROZEN", "THAWED", cg / "freezer.state")
        if (cg / "cgroup.freeze").exists():
            return Freezer(cg / "cgroup.freeze", "1", "0", cg / "cgroup.events")
    return None


def memory_bytes(name: str) -> int | None:
    """What the instance's memory cgroup is charged (its own pages and page cache; KSM-merged pages stay charged
    to the cgroup that first had them), or None without one."""
    for cg in paths(name):
        for f in ("memory.usage_in_bytes", "memory.current"):
            with contextlib.suppress(OSError, ValueError):
                return int((cg / f).read_text())
    return None


def cpu_seconds(name: str) -> float | None:
    """CPU time the instance's processes have used, in seconds (v1 cpuacct.usage, or v2 cpu.stat), or None
    without a cgroup."""
    for cg in paths(name):
        with contextlib.suppress(OSError, ValueError):
            return int((cg / "cpuacct.usage").read_text()) / 1e9
        with contextlib.suppress(OSError, ValueError, StopIteration):
            stat = (cg / "cpu.stat").read_text().split()
            return int(stat[stat.index("usage_usec") + 1]) / 1e6
    return None


def pids(name: str) -> list[int]:
    """The processes in the instance's cgroup (the app and whatever it forked), or [] without one."""
    for cg in paths(name):
        with contextlib.suppress(OSError, ValueError):
            return [int(p) for p in (cg / "cgroup.procs").read_text().split()]
    return []


def remove(name: str, timeout: float = 2.0) -> list[Path]:
    """Kill every process in the instance's cgroups and remove them; returns what could not be removed."""
    left = paths(name)
    fz = freezer(name)
    if fz is not None:  # a frozen task does not die until it is thawed (v1 freezer)
        with contextlib.suppress(OSError):
            fz.thaw()
    deadline = time.monotonic() + timeout
    while left:
        for cg in left:
            with contextlib.suppress(OSError):  # v2 (5.14+): the kernel kills all of it, forks in flight included
                (cg / "cgroup.kill").write_text("1")
            with contextlib.suppress(OSError):
                for pid in (cg / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                cg.rmdir()
        left = [cg for cg in left if cg.is_dir()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.01)  # killed processes take a moment to leave the cgroup
    return left
