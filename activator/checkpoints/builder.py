"""Building checkpoints: start a template, wait until its app is ready, dump it, keep what it wrote.

Start a template with runc on the image's root filesystem (under the service's seccomp filter), wait until the
app listens on its port (no probe connection is left open), dump it, keep its upper directory as diff/, read the
dump back with pycriu to confirm the port is really among its listening sockets, then swap the directory into
place atomically (checkpoint.py's store). A build that fails for any reason leaves nothing: no container,
mount, namespace or half-written directory; the failure's logs are kept under state_dir/logs.

The wait for a template to be ready is template.py's; what a build and an import both derive from the service and
its image (the process, the kernel path) is recipe.py's; checkpoints to and from other hosts are exchange.py's,
which ensure() asks for a pulled one before it builds.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any, Literal

from activator.config.service import ServiceConfig
from activator.core import pool
from activator.errors import ActivatorError, CheckpointError, RuncError
from activator.net.network import HostNetwork
from activator.runtime import applog, extmounts, seccomp, userns, volumes
from activator.runtime.runc import Runc
from activator.runtime.sandbox import Sandbox, new_name
from activator.runtime.spec import capability_set
from activator.statedir import copy_private

from . import maphazard, recipe, template
from .exchange import CheckpointExchange
from .images import ImageInfo, ImageSource
from .store import (
    FORMAT,
    Checkpoint,
    CheckpointStore,
    Origin,
    files_written,
    listening_addresses,
    listening_ports,
    make_private,
    pages_bytes,
)

log = logging.getLogger("activator.builder")
#: where ensure()'s checkpoint came from
Source = Literal["stored", "built", "pulled"]


class CheckpointBuilder:
    """Makes checkpoints. Owns nothing long-lived: every template it starts is released before it returns."""

    def __init__(
        self, store: CheckpointStore, images: ImageSource, runc: Runc, instances_dir: Path,
        criu: str, runc_version: str, network: HostNetwork | None = None,
    ) -> None:
        self.store = store
        self.network = network
        self.images = images
        self.runc = runc
        self.instances_dir = instances_dir
        self.criu = criu
        self.runc_version = runc_version
        # Services sharing an image build at once at startup: unpack it once, not once per service.
        self._unpacking: dict[str, asyncio.Lock] = {}
        self._builds = 0
        self._not_pruning = asyncio.Event()
        self._not_pruning.set()
        # Templates boot for real (a JVM each): more at once than CPUs only makes every one of them slower,
        # and can push a slow one past its readiness timeout.
        self._building = asyncio.Semaphore(os.cpu_count() or 1)
        self.ranges = userns.Ranges(instances_dir.parent)
        # Checkpoints to and from other hosts: ensure() pulls through it before it builds.
        self.exchange = CheckpointExchange(self)

    def idmap(self, svc: ServiceConfig) -> userns.IdMap | None:
        """The service's user namespace range (None: `userns: host`). One line if this host cannot give it one."""
        if svc.userns == "host":
            return None
        if not userns.supported(self.criu):
            raise CheckpointError(
                f"service '{svc.name}': userns: private needs a CRIU built with activator's patch "
                f"(scripts/criu-patches/; `make setup` builds it), found CRIU {self.criu}; or set 'userns: host'")
        try:
            userns.check_passable(self.instances_dir)
            return self.ranges.for_service(svc.name)
        except ActivatorError as e:
            raise CheckpointError(f"service '{svc.name}': {e}") from None

    def origin(self, svc: ServiceConfig, image: ImageInfo, seccomp_digest: str) -> Origin:
        idmap = self.idmap(svc)
        return Origin(
            format=FORMAT,
            service_fingerprint=svc.checkpoint_fingerprint(),
            image_id=image.id,
            criu=self.criu,
            runc=self.runc_version,
            kernel=os.uname().release,
            seccomp=seccomp_digest,
            userns=str(idmap) if idmap is not None else "host",
        )

    async def wanted(self, svc: ServiceConfig) -> tuple[Origin, ImageInfo, dict[str, Any] | None]:
        """What this host's build of svc would be made from (its Origin), the image, and the seccomp filter."""
        image = await asyncio.to_thread(self.images.resolve, svc.image, svc.name)
        try:
            filt, digest = await asyncio.to_thread(seccomp.load, svc.seccomp,
                                                  list(capability_set(svc.cap_add, svc.cap_drop)))
        except seccomp.ProfileError as e:
            raise CheckpointError(f"service '{svc.name}': seccomp: {e}; fix the profile or set 'seccomp: default'"
                                  ) from None
        return await asyncio.to_thread(self.origin, svc, image, digest), image, filt

    async def current(self, svc: ServiceConfig) -> Checkpoint | None:
        """The service's checkpoint if it is current (nothing is built, nothing of the host is touched)."""
        try:
            wanted, _image, _filt = await self.wanted(svc)
        except CheckpointError:
            return None
        ck = self.store.load(svc.name)
        if ck is None or ck.origin.differences(wanted) or _used_up(svc, ck):
            return None
        return ck if ck.images.is_dir() and ck.image_rootfs.is_dir() else None

    async def ensure(self, svc: ServiceConfig, *, rebuild: bool = False) -> tuple[Checkpoint, Source]:
        """The service's current checkpoint: the stored one, else one pulled from the checkpoint registry (if
        configured), else a new build. Returns (checkpoint, where it came from)."""
        wanted, image, filt = await self.wanted(svc)
        current = self.store.load(svc.name)
        if current is not None and not rebuild:
            stale = current.origin.differences(wanted)
            if _used_up(svc, current):
                log.info("service=%s making its checkpoint again: an instance ran from it and it is stateful (its "
                         "volumes may have changed)", svc.name)
            elif not stale and current.images.is_dir() and current.image_rootfs.is_dir():
                return current, "stored"
            else:
                log.info("service=%s checkpoint is stale (%s changed); rebuilding", svc.name,
                         ", ".join(stale) or "files missing")
        if not rebuild and self.exchange.pulls(svc):
            pulled = await self.exchange.pull(svc, wanted, image, quiet=True)
            if pulled is not None:
                return pulled, "pulled"
        return await self.build(svc, image, wanted, filt), "built"


    async def unpack_image(self, svc: ServiceConfig, image: ImageInfo) -> Path:
        """The image's root filesystem, unpacked once per image ID and shared."""
        rootfs = self.store.image_rootfs(image.short_id)
        try:
            async with self._unpacking.setdefault(image.id, asyncio.Lock()):
                await asyncio.to_thread(self.images.export_rootfs, image, rootfs)
        except OSError as e:
            raise CheckpointError(f"service '{svc.name}': unpacking image '{image.ref}' failed: "
                                  f"{_disk_problem(e, self.store.root) or e}") from None
        return rootfs

    async def build(self, svc: ServiceConfig, image: ImageInfo, origin: Origin,
                    filt: dict[str, Any] | None) -> Checkpoint:
        await self._not_pruning.wait()
        self._builds += 1  # no await since the wait: a prune cannot start in between
        try:
            async with self._building:
                log.info("service=%s building a checkpoint from image %s", svc.name, image.ref)
                return await self._build(svc, image, origin, filt)
        finally:
            self._builds -= 1

    async def prune_images(self) -> list[Path]:
        """Delete unpacked images no checkpoint uses (a service removed, an image updated). Only while no build
        runs (a build's image has no checkpoint yet); builds that start meanwhile wait for it."""
        if self._builds:
            return []
        self._not_pruning.clear()
        try:
            gone = await asyncio.to_thread(self.store.prune_images)
        finally:
            self._not_pruning.set()
        for d in gone:
            log.info("removed unpacked image %s: no checkpoint uses it", d.name)
        return gone

    async def _build(self, svc: ServiceConfig, image: ImageInfo, origin: Origin,
                     filt: dict[str, Any] | None) -> Checkpoint:
        started = time.monotonic()
        rootfs = await self.unpack_image(svc, image)
        process = recipe.process(svc, image, rootfs)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{svc.name}-", dir=self.store.root))
        # The template runs on the same kind of network as its instances: the app saw a real interface.
        network = self.network if svc.network == "bridge" else None
        idmap = None if origin.userns == "host" else userns.IdMap.parse(origin.userns)
        sandbox = Sandbox(new_name(svc.name + "-tpl"), self.instances_dir, self.runc, network, svc.egress, idmap)
        try:
            binds = await asyncio.to_thread(volumes.ensure, svc.volumes, self.instances_dir.parent, rootfs, svc.name,
                                            idmap, (process.uid, process.gid))
            self._warn_unkept_volumes(svc, image)
            await sandbox.prepare([rootfs], process, svc.resources, hostname=svc.hostname or svc.name, seccomp=filt,
                                  template=True, binds=binds)
            sandbox.write_etc(svc.hostname or svc.name, svc.extra_hosts, svc.depends_on)
            try:
                answers = await template.start_and_wait(svc, sandbox, tmp / "template.log",
                                                       self.store.logs / f"{svc.name}-template.log")
            finally:  # what the template wrote, success or not, is kept with the service's output (activator logs)
                await asyncio.to_thread(applog.keep, tmp / "template.log", self.store.logs, sandbox.name)
            pid = await sandbox.pid()
            dev = await asyncio.to_thread(extmounts.snapshot_dev, pid) if pid else ()
            (tmp / "criu").mkdir(mode=0o700)
            await sandbox.checkpoint(tmp / "criu")
            await asyncio.to_thread(make_private, tmp / "criu", idmap)  # CRIU writes 0644; the pages are app memory
            await sandbox.release(keep_dir=True)
            os.rename(sandbox.layout.upper, tmp / "diff")
            proto = "TCP" if "tcp" in svc.protocol else "UDP"  # a UDP-only app is checked by its UDP socket
            ports = await asyncio.to_thread(listening_ports, tmp / "criu", proto)
            if svc.port not in ports:
                raise CheckpointError(
                    f"service '{svc.name}': the checkpoint listens on {list(ports) or f'no {proto} port'}, not on "
                    f"port {svc.port}; set 'port' to the port the app listens on"
                )
            kernel_path = recipe.kernel_path(
                svc, await asyncio.to_thread(listening_addresses, tmp / "criu", svc.port, proto))
            written = await asyncio.to_thread(files_written, tmp / "criu",
                                              [v.target for v in svc.volumes if not v.read_only])
            if written and svc.stateful == "auto":
                log.info("service=%s the app holds %d file(s) of its volumes open for writing (%s%s): stateful, "
                         "one instance at a time and its checkpoint made again after each (stateful: false if "
                         "it reads nothing of them back)", svc.name, len(written), ", ".join(written[:3]),
                         ", ..." if len(written) > 3 else "")
            checkpoint = Checkpoint(
                service=svc.name, dir=tmp, origin=origin, process=process, image_rootfs=rootfs,
                listening_ports=ports, created=time.time(), build_seconds=time.monotonic() - started,
                pages_bytes=pages_bytes(tmp / "criu"), seccomp=filt, kernel_path=kernel_path,
                external=extmounts.mounts(), dev=tuple(dev), stop_signal=image.stop_signal or "SIGTERM",
                writes_volumes=written, probe_answers=tuple(sorted(answers.items())),
                map_hazard=await asyncio.to_thread(maphazard.find, tmp / "criu", [tmp / "diff", rootfs]),
            )
            return self.store.install(tmp, checkpoint)
        except BaseException as e:
            with contextlib.suppress(Exception):
                self._keep_failure_logs(svc, sandbox, tmp)
            await sandbox.release()
            await asyncio.to_thread(shutil.rmtree, tmp, True)
            disk = _disk_problem(e, self.store.root, sandbox.layout.criu_work / "dump.log",
                                 tmp / "criu" / "dump.log", self.store.logs / f"{svc.name}-dump.log")
            if disk is not None:
                raise CheckpointError(f"service '{svc.name}': building its checkpoint failed: {disk}") from e
            if isinstance(e, RuncError):  # runc does not know which service it was working for; say it
                raise CheckpointError(f"service '{svc.name}': building its checkpoint failed: {e}; logs in "
                                      f"{self.store.logs}/{svc.name}-*") from e
            if isinstance(e, OSError):
                log.debug("service=%s checkpoint build failed", svc.name, exc_info=True)
                raise CheckpointError(f"service '{svc.name}': building its checkpoint failed: {e}") from e
            raise
        finally:
            await asyncio.to_thread(shutil.rmtree, sandbox.layout.dir, True)

    def _warn_unkept_volumes(self, svc: ServiceConfig, image: ImageInfo) -> None:
        """An image's VOLUME holds data its author meant to keep; without a volume there, it dies with the
        instance. Said once per build, with the fix."""
        kept = {v.target for v in svc.volumes}
        for path in image.volumes:
            if path.rstrip("/") not in kept:
                name = path.strip("/").replace("/", "-") or "data"
                log.warning("service=%s image %s declares VOLUME %s, which is not a volume here: what the app "
                            "writes there is lost when an instance goes; add `volumes: [%s-%s:%s]` to keep it",
                            svc.name, image.ref, path, svc.name, name, path)

    def _keep_failure_logs(self, svc: ServiceConfig, sandbox: Sandbox, tmp: Path) -> None:
        self.store.logs.mkdir(mode=0o700, parents=True, exist_ok=True)
        for src, name in ((tmp / "template.log", "template.log"), (sandbox.layout.criu_work / "dump.log", "dump.log"),
                          (tmp / "criu" / "dump.log", "dump.log"), (sandbox.layout.runc_log, "runc.log")):
            if src.exists():
                copy_private(src, self.store.logs / f"{svc.name}-{name}")


def _used_up(svc: ServiceConfig, ck: Checkpoint) -> bool:
    """A stateful checkpoint an instance has run from: the volumes have moved on from what its memory holds."""
    return pool.stateful(svc.stateful, bool(ck.writes_volumes)) and ck.used


def _disk_problem(e: BaseException, state_dir: Path, *logs: Path) -> str | None:
    """A full disk shows up as ENOSPC from our own writes, or only in CRIU's log (runc just says 'criu failed')."""
    full = isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT)
    for log_path in logs:
        with contextlib.suppress(OSError):
            if b"No space left on device" in log_path.read_bytes()[-65536:]:
                full = True
    if not full:
        return None
    with contextlib.suppress(OSError):
        st = os.statvfs(state_dir)
        free = st.f_bavail * st.f_frsize
        return (f"no space left on the device of state_dir ({free // 2**20} MiB free under {state_dir}); "
                "free some space and try again")
    return f"no space left on the device of state_dir ({state_dir}); free some space and try again"
