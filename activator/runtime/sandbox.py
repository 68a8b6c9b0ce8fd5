"""One instance's resources, made and released together.

A sandbox is: a directory (state_dir/instances/NAME), a network namespace (activator-NAME, lo up, and with
`network: bridge` an eth0 on activator's bridge: network.py), an overlay root filesystem, an OCI bundle and a
runc container of the same NAME, with cgroup /activator/NAME. The
container is then either started fresh (`runc run`: the template, or a cold-start fallback) or restored from a
checkpoint (`runc restore`). release() undoes all of it in reverse order and keeps going past errors, so an
instance never leaks half its resources because one step failed.

The names are what crash recovery looks for: anything called activator-* / instances/* / cgroup activator/*
that no live sandbox owns is a leftover.

The sandbox is made in three rooms: sandboxstate.py (the record, and what it answers without changing anything),
sandboxprep.py (making it: directory, namespace, root filesystem, volumes, bundle or restore config) and this
one (running, freezing, stopping and releasing it); etcfiles.py writes its /etc/hosts and resolv.conf.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import signal
import socket
import time
from pathlib import Path
from typing import Any

from activator.config.sections import Resources
from activator.errors import RuncError
from activator.statedir import open_private

from . import applog, cgroups, etcfiles, rootfs, sandboxprep
from .procs import holds_socket, start_time
from .sandboxprep import Dump
from .sandboxstate import SandboxState
from .spec import ProcessSpec
from .volumes import Bind

log = logging.getLogger("activator.sandbox")


def new_name(service: str) -> str:
    return f"{service}-{secrets.token_hex(4)}"


class Sandbox(SandboxState):
    async def prepare(self, lower: list[Path], process: ProcessSpec, resources: Resources, hostname: str,
                      seccomp: dict[str, Any] | None, *, template: bool = False,
                      restore: Dump | None = None, binds: tuple[Bind, ...] = (),
                      handoff: tuple[int, socket.socket] | None = None) -> None:
        """Namespace, mount and bundle: everything runc needs; a template is dumped with its own tmpfs mounts
        external, and an instance to be restored gets them made here (extmounts.py). On failure, what was made
        is released."""
        work = asyncio.ensure_future(asyncio.to_thread(
            sandboxprep.prepare, self, lower, process, resources, hostname, seccomp, template, restore, binds,
            handoff))
        try:
            await asyncio.shield(work)
        except BaseException:
            # Cancelled (a shutdown, a replaced checkpoint): the thread goes on regardless, and releasing while
            # it still mounts or spawns would leave what it makes after that behind.
            await asyncio.wait([work])
            await self.release()
            raise

    def unmark_slot(self) -> None:
        """No longer a prepared slot: it is being restored into."""
        self.slot = False
        (self.layout.dir / "slot").unlink(missing_ok=True)

    def write_etc(self, hostname: str, extra_hosts: tuple[tuple[str, str], ...] = (),
                  dependencies: tuple[str, ...] = ()) -> None:
        """/etc/hosts (and, on the bridge, /etc/resolv.conf) for the app, written before it starts (etcfiles.py)."""
        etcfiles.write(self.layout.rootfs, hostname,
                       gateway=str(self.network.gateway) if self.network is not None else None,
                       # The instance's root owns them, as in `docker run` (and may change them).
                       owner=self.idmap.host if self.idmap is not None else None,
                       extra_hosts=extra_hosts, dependencies=dependencies)

    async def start(self, stdout: int, stderr: int) -> None:
        self._container = True
        await self.runc.run(self.name, self.layout.bundle, stdout=stdout, stderr=stderr, log=self.layout.runc_log,
                            mergeable=self.mergeable)

    async def restore(self, image_path: Path) -> None:
        if self.restorer is not None:  # through CRIU directly (criurestore.py)
            restorer, self.restorer = self.restorer, None
            pid = await restorer.restore(root=self.layout.rootfs, config=self.layout.dir / "criu.conf",
                                         descriptors=image_path / "descriptors.json")
            started = start_time(pid)
            if started is None:
                raise RuncError(f"the restored app (pid {pid}) exited at once; see {self.layout.output}")
            self._pid = (pid, started)
            # Handed in only if the app now holds our socket: a CRIU without the patch makes its own listener
            # silently, and nobody would accept what the activator then leaves to the app.
            self.handed = self.handoff_inode is not None and holds_socket(pid, self.handoff_inode)
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

    def thaw(self) -> None:
        """Let a frozen app run again: one write to its freezer, on the caller's thread (a connection waits)."""
        if self._freezer is not None:
            fz, self._freezer = self._freezer, None
            fz.thaw()

    async def probe(self, args: tuple[str, ...], *, timeout: float, output: int) -> int | None:
        """Run args in the running container; exit status, or None on timeout."""
        return await self.runc.probe(self.name, args, timeout=timeout, output=output, log=self.layout.runc_log)

    async def checkpoint(self, image_path: Path) -> None:
        await self.runc.checkpoint(self.name, image_path, self.layout.criu_work, log=self.layout.runc_log)

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
        if self.restorer is not None:  # prepared and never used
            try:
                self.restorer.discard()
            except Exception as e:
                errors.append(f"criu swrk: {e}")
            self.restorer = None
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
        if self.mounted or self.layout.rootfs.exists():
            try:
                rootfs.unmount(self.layout.rootfs)
                self.mounted = False
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
        if not keep_dir and not self.mounted:
            for _ in range(20):  # a process that was just killed may still be closing files in it
                shutil.rmtree(self.layout.dir, ignore_errors=True)
                if not self.layout.dir.exists():
                    break
                time.sleep(0.05)
            else:
                errors.append(f"{self.layout.dir} could not be removed")


def _catches(pid: int, sig: int) -> bool:
    """Has the process a handler for sig (SigCgt in /proc/PID/status)?"""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    except (OSError, ValueError):
        pass
    return False
