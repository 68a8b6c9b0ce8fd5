"""One instance's resources, made and released together.

A sandbox is: a directory (state_dir/instances/NAME), a network namespace (activator-NAME, lo up, and with
`network: bridge` an eth0 on activator's bridge: network.py), an overlay root filesystem, an OCI bundle and a
runc container of the same NAME, with cgroup /activator/NAME. The
container is then either started fresh (`runc run`: the template, or a cold-start fallback) or restored from a
checkpoint (`runc restore`). release() undoes all of it in reverse order and keeps going past errors, so an
instance never leaks half its resources because one step failed.

The names are what crash recovery looks for: anything called activator-* / instances/* / cgroup activator/*
that no live sandbox owns is a leftover.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from activator.config.sections import Resources
from activator.errors import ActivatorError, RuncError
from activator.net.netns import PREFIX as NETNS_PREFIX
from activator.net.netns import NetNamespace
from activator.net.network import Attachment, HostNetwork
from activator.statedir import copy_private, open_private, write_private

from . import applog, cgroups, criurestore, extmounts, imagefs, readiness, rootfs
from .extmounts import DevEntry
from .procs import holds_socket, socket_inodes, start_time
from .runc import Runc, restore_config
from .spec import ProcessSpec, runtime_spec
from .userns import IdMap, holding, idmapped_mount
from .volumes import Bind

log = logging.getLogger("activator.sandbox")


class Dump(Protocol):
    """What preparing a restore needs of a checkpoint (activator.checkpoints.store.Checkpoint is one)."""

    @property
    def images(self) -> Path: ...

    @property
    def external(self) -> dict[str, str]: ...

    @property
    def dev(self) -> tuple[DevEntry, ...]: ...


def new_name(service: str) -> str:
    return f"{service}-{secrets.token_hex(4)}"


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


class Sandbox:
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
        # Prepared ahead, waiting for a restore: marked by a `slot` file from the moment its directory exists,
        # so the tests' leak checks (and an operator) tell slots from leftovers.
        self.slot = False
        self.created = time.monotonic()
        self._mounted = False
        self._container = False  # a runc container of this name may exist (delete it on release)
        # Restored through CRIU directly (criurestore.py): our own cgroups, and the app's pid and start time.
        self._restorer: criurestore.Restorer | None = None
        self._pid: tuple[int, int] | None = None
        self._freezer: cgroups.Freezer | None = None  # set while the instance is frozen (a standby)
        # handoff: the inode of the service's listening socket given to CRIU, and whether the app holds it
        self._handoff_inode: int | None = None
        self.handed = False

    async def prepare(self, lower: list[Path], process: ProcessSpec, resources: Resources, hostname: str,
                      seccomp: dict[str, Any] | None, *, template: bool = False,
                      restore: Dump | None = None, binds: tuple[Bind, ...] = (),
                      handoff: tuple[int, socket.socket] | None = None) -> None:
        """Namespace, mount and bundle: everything runc needs; a template is dumped with its own tmpfs mounts
        external, and an instance to be restored gets them made here (extmounts.py). On failure, what was made
        is released."""
        work = asyncio.ensure_future(asyncio.to_thread(
            self._prepare_blocking, lower, process, resources, hostname, seccomp, template, restore, binds,
            handoff))
        try:
            await asyncio.shield(work)
        except BaseException:
            # Cancelled (a shutdown, a replaced checkpoint): the thread goes on regardless, and releasing while
            # it still mounts or spawns would leave what it makes after that behind.
            await asyncio.wait([work])
            await self.release()
            raise

    def _prepare_blocking(
        self, lower: list[Path], process: ProcessSpec, resources: Resources, hostname: str,
        seccomp: dict[str, Any] | None, template: bool, restore: Dump | None, binds: tuple[Bind, ...],
        handoff: tuple[int, socket.socket] | None,
    ) -> None:
        lay = self.layout
        # Private: the bundle holds the environment (secrets), the upper dir the app's writes, criu-work its logs.
        lay.dir.mkdir(mode=0o700, parents=True)
        if self.service is not None:
            applog.record_owner(lay.dir, self.service)
        if self.idmap is not None:
            # In a user namespace, runc and CRIU reach the root filesystem and the volumes (below) by path as the
            # instance's root: its group may pass through this directory, nobody else (instances/ is 0711).
            os.chown(lay.dir, 0, self.idmap.host)
            os.chmod(lay.dir, 0o710)
        lay.bundle.mkdir(mode=0o700)
        lay.criu_work.mkdir(mode=0o700)
        if self.slot:
            (lay.dir / "slot").touch()
        userns_path = None
        if template and self.idmap is not None:
            # The template's network namespace belongs to its user namespace (both made here, ahead of runc), so
            # `runc exec` (a readiness command), which joins the user namespace first, can join it. Instances
            # are restored into a user namespace CRIU makes and a network namespace made outside it (CRIU patch).
            userns_path = lay.dir / "userns"
            with holding(self.idmap, net=True) as pid:
                self.netns = NetNamespace.create_owned(self.netns.name, pid)
                userns_path.touch(mode=0o400)
                rootfs.bind(Path(f"/proc/{pid}/ns/user"), userns_path)
        else:
            self.netns = NetNamespace.create(self.netns.name)
        if self.network is not None:
            self.attachment = self.network.allocate(self.name, self.egress)
            self.network.plug(self.attachment, self.netns)
        sysfs = None
        if self.idmap is not None:
            sysfs = lay.dir / "sys"
            self.netns.mount_sysfs(sysfs)
        # The merged root takes the upper dir's mode: it must be the image root's, not our private 0700, or a
        # non-root app could not even look up its own files.
        lay.upper.mkdir(mode=0o700)
        os.chmod(lay.upper, os.stat(lower[-1]).st_mode & 0o7777)
        if self.idmap is not None:
            # The image's files as the range sees them, without a copy (userns.py); the upper dir (what the app
            # writes, later the checkpoint's diff layer) is the range's own.
            idmapped_mount(lower[-1], lay.dir / "image", self.idmap)
            lower = [*lower[:-1], lay.dir / "image"]
            os.chown(lay.upper, self.idmap.host, self.idmap.host)
            binds = self._rebind(binds)
        rootfs.mount_overlay(lower, lay.upper, lay.overlay_work, lay.rootfs)
        self._mounted = True
        criu_config = self.runc.criu_config
        if template:
            criu_config = self.runc.criu_dump_config
        elif restore is not None and restore.external:
            paths = extmounts.prepare(lay.dir / "ext", restore.dev, restore.external,
                                      self.idmap.host if self.idmap is not None else None)
            direct = cgroups.direct()
            if direct:  # volumes too: runc would map them itself, CRIU alone is told (dumped keyed by target)
                paths |= {b.target: b.host for b in binds}
                if sysfs is not None:  # the same: a bind in the spec
                    paths["/sys"] = sysfs
            criu_config = lay.dir / "criu.conf"
            write_private(criu_config, restore_config(paths))
            if direct:  # restored through CRIU directly: its cgroups are ours to make
                try:
                    procs = cgroups.create(self.name, resources.memory, resources.cpus, resources.pids)
                except OSError as e:
                    raise ActivatorError(f"resources: the kernel refused this instance's limits ({e.strerror}: "
                                         f"memory {resources.memory}, cpus {resources.cpus}, pids {resources.pids})"
                                         ) from None
                inherit = {}
                if handoff is not None:  # the app's listener on this port becomes the service's own socket
                    port, listener = handoff
                    inherit[f"tcp-listen:{port}"] = listener.fileno()
                    self._handoff_inode = os.fstat(listener.fileno()).st_ino
                self._restorer = criurestore.Restorer.spawn(
                    criu=self.runc.criu, images=restore.images, work=lay.criu_work, netns=self.netns.path,
                    output=lay.output, procs=procs, mergeable=self.mergeable, inherit=inherit)
        spec = runtime_spec(
            process,
            rootfs=str(lay.rootfs),
            netns_path=str(self.netns.path),
            cgroups_path=f"/{cgroups.PARENT}/{self.name}",
            hostname=hostname,
            resources=resources,
            criu_config=str(criu_config),
            seccomp=seccomp,
            binds=binds,
            idmap=self.idmap,
            userns_path=str(userns_path) if userns_path is not None else None,
            sysfs=str(sysfs) if sysfs is not None else None,
        )
        write_private(lay.bundle / "config.json", json.dumps(spec))

    def _rebind(self, binds: tuple[Bind, ...]) -> tuple[Bind, ...]:
        """Each volume bound again inside this instance's directory, where the instance's root may pass: the
        volumes themselves live under state_dir/volumes (root only), and a host path's parents may be private."""
        out = []
        for i, b in enumerate(binds):
            here = self.layout.dir / "vol" / str(i)
            if b.idmapped and self.idmap is not None:
                # Passable (the instance's 0710 directory keeps others out): the restore opens every volume here
                # as the instance's root, and a 0700 vol/ made first by this branch hid the plain binds after it.
                here.parent.mkdir(mode=0o755, exist_ok=True)
                idmapped_mount(b.host, here, self.idmap)
            else:
                rootfs.bind(b.host, here)
            out.append(Bind(here, b.target, b.read_only))
        return tuple(out)

    def unmark_slot(self) -> None:
        """No longer a prepared slot: it is being restored into."""
        self.slot = False
        (self.layout.dir / "slot").unlink(missing_ok=True)

    def write_etc(self, hostname: str, extra_hosts: tuple[tuple[str, str], ...] = (),
                  dependencies: tuple[str, ...] = ()) -> None:
        """/etc/hosts (and, on the bridge, /etc/resolv.conf) for the app, written before it starts.

        The hostname resolves to 127.0.0.1, not to the instance's address: the template's address is not an
        instance's, and a JVM caches what its hostname resolved to when it started, before the dump. Each
        dependency's name resolves to the gateway, where the dependency's listener (or its steering) is, as a
        Compose service's name resolves to its container."""
        # Written by root on the host into the image's tree: every path is resolved inside the root filesystem
        # (imagefs), so an image whose /etc is a symlink to a host directory gets its own /etc written, not that.
        lines = [_hosts_line("127.0.0.1", "localhost", hostname), "::1\tlocalhost ip6-localhost ip6-loopback"]
        # The instance's root owns them, as in `docker run` (and may change them).
        owner = self.idmap.host if self.idmap is not None else None
        if self.network is not None:
            lines.append(_hosts_line(str(self.network.gateway), "host.activator.internal"))
            lines += [_hosts_line(str(self.network.gateway), name) for name in dependencies]
        lines += [_hosts_line(addr, name) for name, addr in extra_hosts]
        root = self.layout.rootfs
        if self.network is not None and \
                not imagefs.replace_file(root, "/etc", "resolv.conf", resolv_conf(), owner=owner):
            return  # no /etc in the image
        imagefs.replace_file(root, "/etc", "hosts", "\n".join(lines) + "\n", owner=owner)

    async def start(self, stdout: int, stderr: int) -> None:
        self._container = True
        await self.runc.run(self.name, self.layout.bundle, stdout=stdout, stderr=stderr, log=self.layout.runc_log,
                            mergeable=self.mergeable)

    async def restore(self, image_path: Path) -> None:
        if self._restorer is not None:  # through CRIU directly (criurestore.py)
            restorer, self._restorer = self._restorer, None
            pid = await restorer.restore(root=self.layout.rootfs, config=self.layout.dir / "criu.conf",
                                         descriptors=image_path / "descriptors.json")
            started = start_time(pid)
            if started is None:
                raise RuncError(f"the restored app (pid {pid}) exited at once; see {self.layout.output}")
            self._pid = (pid, started)
            # Handed in only if the app now holds our socket: a CRIU without the patch makes its own listener
            # silently, and nobody would accept what the activator then leaves to the app.
            self.handed = self._handoff_inode is not None and holds_socket(pid, self._handoff_inode)
            return
        self._container = True
        fd = open_private(self.layout.output)
        try:
            await self.runc.restore(
                self.name, self.layout.bundle, image_path, self.layout.criu_work,
                stdout=fd, stderr=fd, log=self.layout.runc_log, mergeable=self.mergeable,
            )
        finally:
            os.close(fd)

    async def freeze(self) -> None:
        """Stop the restored app where it is (a standby): no CPU, no timers, until thaw()."""
        fz = await asyncio.to_thread(cgroups.freezer, self.name)
        if fz is None:
            raise RuncError(f"instance {self.name} has no freezer cgroup")
        self._freezer = fz
        await asyncio.to_thread(fz.freeze)

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

    def thaw(self) -> None:
        """Let a frozen app run again: one write to its freezer, on the caller's thread (a connection waits)."""
        if self._freezer is not None:
            fz, self._freezer = self._freezer, None
            fz.thaw()

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

    async def probe(self, args: tuple[str, ...], *, timeout: float, output: int) -> int | None:
        """Run args in the running container; exit status, or None on timeout."""
        return await self.runc.probe(self.name, args, timeout=timeout, output=output, log=self.layout.runc_log)

    async def checkpoint(self, image_path: Path) -> None:
        await self.runc.checkpoint(self.name, image_path, self.layout.criu_work, log=self.layout.runc_log)

    async def pid(self) -> int | None:
        return self.pid_now()

    def pid_now(self) -> int | None:
        """The app's pid while it is alive (not a zombie, and the same process: its start time matches)."""
        if self._pid is not None:
            pid, started = self._pid
            return pid if start_time(pid) == started else None
        return self.runc.pid(self.name)

    async def stop(self, sig: int, grace: float) -> str:
        """Ask the app to exit (what `docker stop` does) and wait up to grace: "exited", "timeout", or "deaf". The
        app is PID 1 of its namespace, so the kernel drops a signal it has no handler for: then there is nothing
        to wait for, and it is not sent ("deaf"; release() kills it)."""
        pid = self.pid_now()
        if pid is None:
            return "exited"
        if not _catches(pid, sig):
            return "deaf"
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
        deadline = time.monotonic() + grace
        while self.pid_now() is not None:
            if time.monotonic() > deadline:
                return "timeout"
            await asyncio.sleep(0.05)
        return "exited"

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

    async def release(self, *, keep_dir: bool = False) -> None:
        errors: list[str] = []
        if self._freezer is not None:  # a frozen task dies once thawed (v1), and runc would wait for it
            with contextlib.suppress(OSError, RuncError):
                pid = self.pid_now()
                if pid is not None:  # killed first: the app never runs again, not even for a moment
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(OSError):
                self.thaw()
        if self._container:
            try:
                await self.runc.delete(self.name)
                self._container = False
            except Exception as e:
                errors.append(f"runc delete: {e}")
        await asyncio.to_thread(self._release_blocking, errors, keep_dir)
        if errors:
            log.warning("sandbox %s: cleanup incomplete: %s", self.name, "; ".join(errors))
            self.runc.failures.append(f"{self.name}: {'; '.join(errors)}")

    def _release_blocking(self, errors: list[str], keep_dir: bool) -> None:
        """Every step runs whatever an earlier one raised: what can be released is released."""
        # The app first, on its own: it is PID 1 of its namespace, so SIGKILL takes every process in it, even if
        # its cgroups cannot be walked or removed below.
        try:
            pid = self.pid_now()
            if pid is not None:
                os.kill(pid, signal.SIGKILL)
        except (OSError, RuncError) as e:
            if not isinstance(e, ProcessLookupError):
                errors.append(f"kill: {e}")
        if self._restorer is not None:  # prepared and never used
            try:
                self._restorer.discard()
            except Exception as e:
                errors.append(f"criu swrk: {e}")
            self._restorer = None
        # Normally all gone with `runc delete`; not when runc was killed before it recorded the container.
        try:
            stuck = cgroups.remove(self.name)
        except Exception as e:
            stuck = [Path(f"({e})")]
        if stuck:
            errors.append(f"cgroups not removed: {', '.join(map(str, stuck))}")
        try:
            self.runc.forget(self.name)
        except OSError as e:
            errors.append(f"runc leftovers: {e}")
        if self._mounted or self.layout.rootfs.exists():
            try:
                rootfs.unmount(self.layout.rootfs)
                self._mounted = False
            except Exception as e:
                errors.append(str(e))
        # Whatever else is mounted in the instance's directory: a CRIU killed in the middle of a restore leaves
        # its "cgroup yard" (a tmpfs with every cgroup hierarchy mounted inside) in criu-work/.
        for point in rootfs.mounts_under(self.layout.dir):
            try:
                rootfs.unmount(point)
            except Exception as e:
                errors.append(str(e))
        if self.attachment is not None and self.network is not None:
            try:
                self.network.unplug(self.attachment)
                self.attachment = None
            except Exception as e:
                errors.append(f"network: {e}")
        try:
            self.netns.remove()
        except Exception as e:
            errors.append(f"netns: {e}")
        if not keep_dir:  # the app's output outlives its instance (applog.py)
            try:
                applog.keep(self.layout.output, self.layout.dir.parent.parent / "logs", self.name)
            except OSError as e:
                errors.append(f"keeping its output: {e}")
        if not keep_dir and not self._mounted:
            for _ in range(20):  # a process that was just killed may still be closing files in it
                shutil.rmtree(self.layout.dir, ignore_errors=True)
                if not self.layout.dir.exists():
                    break
                time.sleep(0.05)
            else:
                errors.append(f"{self.layout.dir} could not be removed")


#: how long an app may listen on other ports only before the template is given up on (it may open an admin port
#: first and its service port a moment later)
ELSEWHERE_GRACE = 5.0


#: a name in /etc/hosts: what a host name may hold, nothing that would end its line or start a comment
_HOSTS_NAME = re.compile(r"[A-Za-z0-9_.-]{1,253}")


def _hosts_line(addr: str, *names: str) -> str:
    """One /etc/hosts line from checked values (ActivatorError naming the value otherwise)."""
    try:
        ipaddress.ip_address(addr)
    except ValueError:
        raise ActivatorError(f"/etc/hosts: {addr!r} is not an IP address") from None
    for name in names:
        if not isinstance(name, str) or not _HOSTS_NAME.fullmatch(name):
            raise ActivatorError(f"/etc/hosts: {name!r} is not a host name (letters, digits, _ . - only)")
    return f"{addr}\t{' '.join(names)}"


def resolv_conf() -> str:
    """The host's name servers an instance can reach (as Docker does it): loopback ones are dropped, since they
    are the instance's own loopback in its namespace; systemd-resolved's upstream list is used when the host's
    file only names its stub resolver; with nothing left, Docker's fallback (public resolvers)."""
    servers, other = _read_resolv(Path("/etc/resolv.conf"))
    if not servers:
        servers, _ = _read_resolv(Path("/run/systemd/resolve/resolv.conf"))
    if not servers:
        servers = ["8.8.8.8", "8.8.4.4"]
    return "".join(f"nameserver {s}\n" for s in servers) + "".join(f"{line}\n" for line in other)


def _read_resolv(path: Path) -> tuple[list[str], list[str]]:
    servers: list[str] = []
    other: list[str] = []
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            words = line.split()
            if not words or words[0].startswith(("#", ";")):
                continue
            if words[0] == "nameserver" and len(words) > 1:
                if not (words[1].startswith("127.") or words[1] == "::1"):
                    servers.append(words[1])
            elif words[0] in ("search", "options"):
                other.append(line.strip())
    return servers, other


def _catches(pid: int, sig: int) -> bool:
    """Has the process a handler for sig (SigCgt in /proc/PID/status)?"""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False
