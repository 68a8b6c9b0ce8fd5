"""One sandbox's record, and what it answers without changing anything.

The record is what its two other rooms share: sandboxprep.py fills it in while it makes the sandbox, sandbox.py
runs, stops and releases what it says was made. The questions (the app's pid, its memory and CPU, its sockets,
whether it listens, a connection into its namespace) only read it, the kernel's view of the app, or /proc.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

from activator.net.netns import PREFIX as NETNS_PREFIX
from activator.net.netns import NetNamespace
from activator.net.network import Attachment, HostNetwork
from activator.statedir import copy_private

from . import cgroups, criurestore, readiness
from .procs import socket_inodes, start_time
from .runc import Runc
from .userns import IdMap

#: how long an app may listen on other ports only before the template is given up on (it may open an admin port
#: first and its service port a moment later)
ELSEWHERE_GRACE = 5.0


@dataclass(frozen=True)
class Layout:
    dir: Path

    @property
    def rootfs(self) -> Path:
        return self.dir / "rootfs"

    @property
    def upper(self) -> Path:
        return self.dir / "upper"

    @property
    def overlay_work(self) -> Path:
        return self.dir / "ovl-work"

    @property
    def bundle(self) -> Path:
        return self.dir / "bundle"

    @property
    def criu_work(self) -> Path:
        return self.dir / "criu-work"

    @property
    def runc_log(self) -> Path:
        return self.dir / "runc.log"

    @property
    def output(self) -> Path:
        return self.dir / "output.log"


class SandboxState:
    def __init__(self, name: str, instances_dir: Path, runc: Runc, network: HostNetwork | None = None,
                 egress: bool = True, idmap: IdMap | None = None, service: str | None = None) -> None:
        self.name = name
        self.service = service  # whose instance it is, recorded in its directory (applog.owner); None: a template
        self.idmap = idmap  # the service's user namespace range (userns.py); None: `userns: host`
        self.layout = Layout(instances_dir / name)
        self.runc = runc
        self.netns = NetNamespace(NETNS_PREFIX + name)
        self.network = network
        self.egress = egress
        self.attachment: Attachment | None = None
        self.mergeable = False  # KSM may merge the app's memory with its siblings' (ksm.py)
        self.map_memory = False  # restored by mapping its checkpoint's pages (restore_memory: map)
        # Prepared ahead, waiting for a restore: marked by a `slot` file from the moment its directory exists,
        # so the tests' leak checks (and an operator) tell slots from leftovers.
        self.slot = False
        self.created = time.monotonic()
        # What preparing made that release() must undo even when a later step failed (sandboxprep.py sets them).
        self.mounted = False
        # Restored through CRIU directly (criurestore.py): our own cgroups, and the app's pid and start time.
        self.restorer: criurestore.Restorer | None = None
        # handoff: the inode of the service's listening socket given to CRIU, and whether the app holds it
        self.handoff_inode: int | None = None
        self.handed = False
        self._container = False  # a runc container of this name may exist (delete it on release)
        self._pid: tuple[int, int] | None = None
        self._freezer: cgroups.Freezer | None = None  # set while the instance is frozen (a standby)

    @property
    def frozen(self) -> bool:
        return self._freezer is not None

    def memory_bytes(self) -> int | None:
        """What its memory cgroup is charged now (cgroups.memory_bytes)."""
        return cgroups.memory_bytes(self.name)

    def cpu_seconds(self) -> float | None:
        """CPU time its processes have used (cgroups.cpu_seconds)."""
        return cgroups.cpu_seconds(self.name)

    def socket_inodes(self) -> set[int]:
        """Blocking. The sockets every process of the instance holds (the app may have forked one per client)."""
        found: set[int] = set()
        pid = self.pid_now()
        for p in cgroups.pids(self.name) or ([pid] if pid is not None else []):
            found |= socket_inodes(p)
        return found

    def connector(self, port: int) -> readiness.Connect:
        """Connections to the app on 127.0.0.1 inside its namespace (probes and warm-up requests)."""
        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            sock = self.netns.socket()
            try:
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
            except BaseException:
                sock.close()
                raise
            return await asyncio.open_connection(sock=sock)

        return connect

    async def pid(self) -> int | None:
        return self.pid_now()

    def pid_now(self) -> int | None:
        """The app's pid while it is alive (not a zombie, and the same process: its start time matches)."""
        if self._pid is not None:
            pid, started = self._pid
            return pid if start_time(pid) == started else None
        return self.runc.pid(self.name)

    async def alive(self) -> bool:
        return await self.pid() is not None

    async def wait_listening(self, port: int, timeout: float, *, udp: bool = False) -> str | None:
        """None once the app listens on port (read from /proc: no connection is made; with udp, once it has a
        UDP socket bound to it); else "exited", "timeout", or "elsewhere:P1,P2" when it has listened on other
        ports only, for ELSEWHERE_GRACE seconds (a wrong `port` is said at once, not after the whole readiness
        timeout)."""
        pid = await self.pid()
        elsewhere: list[int] = []
        since: float | None = None

        def check() -> bool:
            nonlocal since, elsewhere
            assert pid is not None
            ports = readiness.udp_ports(pid) if udp else \
                {p for p, st in readiness.socket_table(pid) if st == readiness.TCP_LISTEN}
            if port in ports:
                return True
            if not ports:
                since = None
                return False
            now = time.monotonic()
            since = since or now
            elsewhere = sorted(ports)
            return now - since >= ELSEWHERE_GRACE

        if pid is not None and await readiness.wait_until(check, timeout=timeout, alive=self.alive):
            listening = port in readiness.udp_ports(pid) if udp else readiness.is_listening(pid, port)
            return None if not elsewhere or listening else \
                "elsewhere:" + ",".join(map(str, elsewhere))
        return "timeout" if await self.alive() else "exited"

    def keep_log(self, dest: Path, *sources: Path) -> Path | None:
        """Copy a failure's logs out of the sandbox dir before release() deletes it."""
        dest.mkdir(mode=0o700, parents=True, exist_ok=True)
        kept = None
        for src in sources:
            if src.exists():
                target = dest / f"{self.name}-{src.name}"
                with contextlib.suppress(OSError):
                    copy_private(src, target)
                    kept = kept or target
        return kept
