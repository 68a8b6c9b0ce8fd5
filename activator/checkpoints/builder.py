"""Building checkpoints: start a template, wait until its app is ready, dump it, keep what it wrote.

Start a template with runc on the image's root filesystem (under the service's seccomp filter), wait until the
app listens on its port (no probe connection is left open), dump it, keep its upper directory as diff/, read the
dump back with pycriu to confirm the port is really among its listening sockets, then swap the directory into
place atomically (checkpoint.py's store). A build that fails for any reason leaves nothing: no container,
mount, namespace or half-written directory; the failure's logs are kept under state_dir/logs.
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
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activator.config.probes import probe_paths
from activator.config.service import ServiceConfig
from activator.core import pool, probes
from activator.errors import ActivatorError, CheckpointError, RuncError, StartError
from activator.net.network import HostNetwork, kernel_path_possible
from activator.runtime import applog, extmounts, readiness, seccomp, seccompref, userns, volumes
from activator.runtime.runc import Runc
from activator.runtime.sandbox import Sandbox, new_name
from activator.runtime.spec import ProcessSpec, capability_set, merge_env, process_args
from activator.statedir import copy_private, open_private
from activator.tasks import spawn

from . import dumpcheck, ociarchive, signing, transfer
from .images import ImageInfo, ImageSource, resolve_user
from .registry import Registry
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
#: how often a long wait during a build says it is still waiting (a JVM can take a minute to listen)
PROGRESS_EVERY = 10.0
#: where ensure()'s checkpoint came from
Source = Literal["stored", "built", "pulled"]


@contextlib.asynccontextmanager
async def _still_waiting(service: str, what: str, budget: float) -> Any:
    """Log every PROGRESS_EVERY seconds while the body runs, so a long build is never silent."""
    async def tick() -> None:
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            log.info("service=%s still waiting %s (%.0fs of %gs)", service, what, time.monotonic() - t0, budget)

    ticker = spawn(tick(), name=f"progress:{service}")
    try:
        yield
    finally:
        ticker.cancel()

PROBE_CLOSE_TIMEOUT = 10.0


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
        self.registry: Registry | None = None  # settings.checkpoint_registry (open_host sets it)
        # settings.checkpoint_trust (open_host loads it): who may sign what this host imports, and its own key
        self.trust = signing.Trust({})
        self.sign_key: Ed25519PrivateKey | None = None
        self.on_transfer: Callable[[str, str, str], None] | None = None  # (service, pull|push, ok|absent|failed)

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
        if not rebuild and self.registry is not None and self.registry.settings.pull and not unshareable(svc):
            pulled = await self.pull(svc, wanted, image, quiet=True)
            if pulled is not None:
                return pulled, "pulled"
        return await self.build(svc, image, wanted, filt), "built"

    # --- checkpoints as OCI images (transfer.py, registry.py) ----------------------------------------------

    def registry_ref(self, svc: ServiceConfig, wanted: Origin) -> str:
        assert self.registry is not None
        return self.registry.ref(svc.name, transfer.tag(wanted, transfer.HostFacts.here()))

    async def export(self, svc: ServiceConfig, out: Path, key: Ed25519PrivateKey | None = None) -> ociarchive.Image:
        """Write the service's current checkpoint as an OCI image archive, signed with key if given."""
        if why := unshareable(svc):
            raise CheckpointError(why)
        ck = await self.current(svc)
        if ck is None:
            raise CheckpointError(f"service '{svc.name}' has no current checkpoint here; build one with `activator "
                                  f"checkpoint {svc.name}` first")
        image = await asyncio.to_thread(self.images.resolve, svc.image, svc.name)
        return await asyncio.to_thread(transfer.export, ck, svc, image, out, self.store.root, key)

    async def import_archive(self, archive: Path, svc: ServiceConfig, *, source: str = "",
                             signature: signing.Signature | None = None, rename: bool = False) -> Checkpoint:
        """Check an OCI checkpoint image against what this host would build for svc and install it (running
        instances carry on with theirs). One line saying what differs if it cannot run here.

        In this order, each before the next touches anything: the signature over the manifest digest (the
        archive's own, or `signature`, pulled beside it), the blobs' digests, the record's origin against this
        host's, the layer's members; then the record is derived here as a build derives it, and CRIU's images
        are checked against it."""
        if why := unshareable(svc):
            raise CheckpointError(why)
        where = source or str(archive)
        image_doc = await asyncio.to_thread(ociarchive.read, archive)
        if signature is None:
            signature = signing.of_annotations(image_doc.envelope, where)
        signer = self.trust.verify(signature, image_doc.digest, where)
        # The signature covers the service the image was made for (its container.name annotation): another
        # service's checkpoint, genuinely signed, is not this one's unless the operator says so (--service).
        made_for = transfer.describe(image_doc.annotations)["container.name"]
        if made_for != svc.name and not rename:
            raise CheckpointError(f"{where}: this checkpoint was made for service '{made_for[:40]}', not "
                                  f"'{svc.name}'; refused (to import it as '{svc.name}' on purpose: `activator "
                                  f"checkpoint import FILE --service {svc.name}`)")
        wanted, image, filt = await self.wanted(svc)
        rootfs = self.store.image_rootfs(image.short_id)
        idmap = await asyncio.to_thread(self.idmap, svc)
        with ociarchive.scratch(self.store.root, f".build-import-{svc.name}-") as tmp:
            got = await asyncio.to_thread(transfer.unpack, image_doc, svc, wanted, idmap, tmp)
            unpacked_here = not rootfs.is_dir()
            if unpacked_here:
                t0 = time.monotonic()
                await self.unpack_image(svc, image)
                log.info("service=%s image unpacked in %.2fs", svc.name, time.monotonic() - t0)
            try:
                derived = await asyncio.to_thread(self._derive, svc, image, rootfs, wanted, filt, got)
                derived = replace(derived, provenance=f"imported {time.strftime('%Y-%m-%d %H:%M:%S')} from "
                                                      f"{where[:200]}: image {image_doc.digest}, {signer}")
            except BaseException:
                if unpacked_here:  # a refused image leaves nothing, not even the image it would have used
                    await self.prune_images()
                raise
            ck = await asyncio.to_thread(self.store.install, got.dir, derived)
        log.info("service=%s checkpoint imported from %s (%s, %s, %d MiB of pages%s)", svc.name, where,
                 image_doc.digest[:19], signer, ck.pages_bytes // 2**20,
                 f"; moved from user namespace range {got.moved_from} to {idmap}" if got.moved_from else "")
        return ck

    def _derive(self, svc: ServiceConfig, image: ImageInfo, rootfs: Path, origin: Origin,
                filt: dict[str, Any] | None, got: transfer.Imported) -> Checkpoint:
        """Blocking. An imported dump's record, made here from the service and the image as a build makes it
        (nothing the archive says about the process, its sandbox or its mounts is used), and the dump checked
        against it."""
        process = self._process(svc, image, rootfs)
        proto = "TCP" if "tcp" in svc.protocol else "UDP"
        try:
            ports = listening_ports(got.images, proto)
            addresses = listening_addresses(got.images, svc.port, proto)
        except Exception as e:  # pycriu raises whatever its decoder meets in a crafted file
            raise CheckpointError(f"service '{svc.name}': the imported dump's sockets are unreadable "
                                  f"({type(e).__name__}); refused") from None
        if svc.port not in ports:
            raise CheckpointError(f"service '{svc.name}': the imported dump listens on {list(ports) or 'nothing'}, "
                                  f"not on port {svc.port}; refused")
        ck = Checkpoint(
            service=svc.name, dir=got.dir, origin=origin, process=process, image_rootfs=rootfs,
            listening_ports=ports, created=got.created, build_seconds=got.build_seconds,
            pages_bytes=pages_bytes(got.images), seccomp=filt, kernel_path=self._kernel_path(svc, addresses),
            external=extmounts.mounts(), dev=transfer.RUNC_DEV, stop_signal=image.stop_signal or "SIGTERM",
            writes_volumes=(), probe_answers=got.probe_answers,
        )
        self._check_dump(ck, svc)
        return ck

    def _check_dump(self, ck: Checkpoint, svc: ServiceConfig) -> None:
        """Blocking. CRIU's images of an imported checkpoint held against what a template of svc, dumped on this
        host, would hold (dumpcheck.py): one line naming the image and field for anything more."""
        try:
            filters = seccompref.reference(ck.seccomp, self.instances_dir.parent, self.runc.binary)
        except seccompref.SeccompRefError as e:
            raise CheckpointError(f"service '{svc.name}': {e}") from None
        expected = dumpcheck.Expected(
            service=svc.name, idmap=ck.idmap, capabilities=frozenset(capability_set(svc.cap_add, svc.cap_drop)),
            process=ck.process, seccomp=filters, external=ck.external, volumes=tuple(v.target for v in svc.volumes),
            **dumpcheck.host_limits(ck.process))
        dumpcheck.strip_cgroup_roots(ck.images)
        dumpcheck.check(ck.images, expected)

    async def pull(self, svc: ServiceConfig, wanted: Origin, image: ImageInfo, *, quiet: bool = False
                   ) -> Checkpoint | None:
        """The checkpoint this host would build, from the registry, installed. Quiet (before a build): None if the
        registry has none or it cannot be had (logged: the caller builds); otherwise that is one line."""
        assert self.registry is not None
        ref = self.registry_ref(svc, wanted)
        started = time.monotonic()
        with ociarchive.scratch(self.store.root, f".build-pull-{svc.name}-") as tmp:
            try:
                # The signature first (a few hundred bytes), verified before anything else is downloaded: an
                # unsigned image, or one whose signature is not a trusted key's, is never fetched. The image is
                # then pulled by the digest the signature names, not by the tag (which its writer may move).
                signature = None
                found, image_ref = True, ref
                if await asyncio.to_thread(self.registry.pull, ref + transfer.SIG_SUFFIX, tmp / "sig.tar"):
                    signature = await asyncio.to_thread(transfer.signature_of, tmp / "sig.tar", ref)
                    self.trust.verify(signature, signature.manifest, ref)
                    image_ref = f"{ref.rpartition(':')[0]}@{signature.manifest}"
                else:  # no signature: as good as no image, unless unsigned ones are accepted (a lab)
                    found = self.trust.insecure_unsigned
                if found:
                    found = await asyncio.to_thread(self.registry.pull, image_ref, tmp / "image.tar")
                pulled = time.monotonic()
                ck = await self.import_archive(tmp / "image.tar", svc, source=ref, signature=signature) \
                    if found else None
            except Exception as e:  # whatever the registry's data made go wrong: counted, and (quiet) built here
                self._transferred(svc, "pull", "failed")
                if not quiet:
                    if isinstance(e, ActivatorError):
                        raise
                    raise CheckpointError(f"service '{svc.name}': pulling {ref} failed: {type(e).__name__}") from e
                log.warning("service=%s pulling its checkpoint failed (%s); building it here", svc.name,
                            e if isinstance(e, ActivatorError) else type(e).__name__)
                return None
        if ck is None:
            self._transferred(svc, "pull", "absent")
            if not quiet:
                raise CheckpointError(f"service '{svc.name}': the checkpoint registry has no signed {ref} (an image "
                                      f"with {ref}{transfer.SIG_SUFFIX} beside it); build one (`activator "
                                      f"checkpoint {svc.name}`) on a host like this one and push it")
            log.info("service=%s the checkpoint registry has no signed %s", svc.name, ref)
            return None
        self._transferred(svc, "pull", "ok")
        log.info("service=%s checkpoint pulled in %.2fs and installed in %.2fs: nothing was built", svc.name,
                 pulled - started, time.monotonic() - pulled)
        return ck

    async def push(self, svc: ServiceConfig) -> str:
        """Export the service's current checkpoint and push it to the registry; its reference."""
        assert self.registry is not None
        wanted, _image, _filt = await self.wanted(svc)
        ref = self.registry_ref(svc, wanted)
        started = time.monotonic()
        if self.sign_key is None and not self.trust.insecure_unsigned:
            raise CheckpointError(f"service '{svc.name}': pushing needs settings.checkpoint_trust.sign_key (hosts "
                                  "that pull refuse unsigned checkpoints)")
        with ociarchive.scratch(self.store.root, f".build-push-{svc.name}-") as tmp:
            try:
                doc = await self.export(svc, tmp / "image.tar", self.sign_key)
                exported = time.monotonic()
                # The image first, then its signature: pullers go by the digest the signature names, so one that
                # reads the signature before or after this push finds the image that signature is for.
                await asyncio.to_thread(self.registry.push, tmp / "image.tar", ref)
                if self.sign_key is not None:
                    sig = signing.sign(self.sign_key, doc.digest)
                    await asyncio.to_thread(transfer.signature_image, sig, tmp / "sig.tar", tmp)
                    await asyncio.to_thread(self.registry.push, tmp / "sig.tar", ref + transfer.SIG_SUFFIX)
            except ActivatorError:
                self._transferred(svc, "push", "failed")
                raise
        self._transferred(svc, "push", "ok")
        log.info("service=%s checkpoint pushed to %s (%d MiB; export %.2fs, push %.2fs)", svc.name, ref,
                 doc.size // 2**20, exported - started, time.monotonic() - exported)
        return ref

    def shares(self, svc: ServiceConfig) -> bool:
        """Does a checkpoint of svc built here go to the registry?"""
        return self.registry is not None and self.registry.settings.push and not unshareable(svc)

    def _transferred(self, svc: ServiceConfig, direction: str, result: str) -> None:
        if self.on_transfer is not None:
            self.on_transfer(svc.name, direction, result)

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
        process = self._process(svc, image, rootfs)
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
                answers = await self._start_and_wait(svc, sandbox, tmp / "template.log")
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
            kernel_path = self._kernel_path(
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

    def _kernel_path(self, svc: ServiceConfig, addresses: list[str]) -> bool:
        """Can instances be reached on their own address? Refuses an app that listens only on the template's."""
        wildcard = {"0.0.0.0", "::"}
        if any(a in wildcard for a in addresses):
            return kernel_path_possible(svc)
        specific = [a for a in addresses if not a.startswith(("127.", "::1"))]
        if specific:
            raise CheckpointError(
                f"service '{svc.name}': the app listens on {specific[0].removesuffix('/v6only')}:{svc.port} only, "
                "an address its instances will not have; make it listen on every address (0.0.0.0) or on 127.0.0.1")
        if kernel_path_possible(svc):
            log.warning("service=%s the app listens on %s only: its connections go through the activator "
                        "(no kernel path); make it listen on 0.0.0.0 for that", svc.name, ", ".join(addresses))
        return False

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

    def _process(self, svc: ServiceConfig, image: ImageInfo, rootfs: Path) -> ProcessSpec:
        args = process_args(image.entrypoint, image.cmd, svc.entrypoint, svc.command)
        if not args:
            raise CheckpointError(
                f"service '{svc.name}': image '{svc.image}' has no Cmd or Entrypoint; set 'command'"
            )
        uid, gid, groups = resolve_user(rootfs, svc.user if svc.user is not None else image.user, svc.name)
        return ProcessSpec(
            args=args,
            env=merge_env(image.env, svc.environment, svc.hostname or svc.name),
            cwd=svc.working_dir or image.working_dir or "/",
            uid=uid, gid=gid, additional_gids=groups, capabilities=capability_set(svc.cap_add, svc.cap_drop),
            rlimits=svc.ulimits, read_only=svc.read_only, tmpfs=tuple((t.target, t.options) for t in svc.tmpfs),
        )

    async def _start_and_wait(self, svc: ServiceConfig, sandbox: Sandbox, output: Path) -> dict[str, probes.Answer]:
        """Start the template and wait until it is ready to dump (listening, readiness, warm-up); returns what it
        answered the probes' paths."""
        # The template's stdio must be a pipe: CRIU cannot dump a descriptor on a host file outside the
        # container, and runc hands pipes over to the restored instance's own stdio on restore.
        answers: dict[str, probes.Answer] = {}
        r, w = os.pipe()
        copier = spawn(_copy_pipe(r, output), name=f"template-output:{svc.name}", awaited=True)
        try:
            await sandbox.start(stdout=w, stderr=w)
        finally:
            os.close(w)
        try:
            budget = svc.readiness.timeout
            deadline = time.monotonic() + budget
            log.info("service=%s template started; waiting up to %gs for it to listen on port %d", svc.name,
                     budget, svc.port)
            async with _still_waiting(svc.name, f"for the app to listen on port {svc.port}", budget):
                problem = await sandbox.wait_listening(svc.port, budget, udp="tcp" not in svc.protocol)
            if problem is not None and problem.startswith("elsewhere:"):
                ports = problem.split(":", 1)[1]
                first = ports.split(",")[0]
                raise StartError(
                    f"service '{svc.name}': the app listens on port {ports.replace(',', ', ')}, not on port "
                    f"{svc.port}; set 'port: {first}' (or make the app listen on {svc.port})"
                )
            if problem == "exited":
                raise StartError(
                    f"service '{svc.name}': the app exited before listening on port {svc.port}; "
                    f"see {self._log_hint(svc)}"
                )
            if problem is not None:
                raise StartError(
                    f"service '{svc.name}': the app did not listen on port {svc.port} within {budget:g}s; "
                    f"check 'port' or raise 'readiness.timeout' (app output: {self._log_hint(svc)})"
                )
            pid = await sandbox.pid()
            if pid is None:
                raise StartError(f"service '{svc.name}': the app exited right after it started listening; "
                                 f"see {self._log_hint(svc)}")
            warm = svc.warmup.http_paths or svc.warmup.payload is not None
            paths = probe_paths(svc.probes)
            if svc.readiness.http_path or svc.readiness.command or warm or paths:
                before = readiness.held_sockets(pid)
                if svc.readiness.http_path:
                    await self._wait_http(svc, sandbox, deadline)
                if svc.readiness.command:
                    await self._wait_command(svc, sandbox, deadline, pid, output)
                if warm:
                    await self._warm_up(svc, sandbox)
                for path in paths:
                    answers[path] = await self._record_probe(svc, sandbox, path)
                # The dump should not capture these connections (they would come back closed, and they are
                # not the app's own); the app may close its end lazily, so wait for the descriptors to go.
                if not await readiness.wait_until(
                    lambda: not readiness.stray_connections(pid, before), timeout=PROBE_CLOSE_TIMEOUT,
                ):
                    raise StartError(
                        f"service '{svc.name}': the app kept the readiness or warm-up connections open for "
                        f"{PROBE_CLOSE_TIMEOUT:g}s after 'Connection: close'; drop 'readiness.http_path'/'warmup'"
                    )
        except BaseException:
            # An app that exited has its output (flushed at exit) in the pipe still: read it to the end before the
            # log an error points to is kept; a live one is not waited for long.
            with contextlib.suppress(TimeoutError, asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(copier), 0.5)
            raise
        finally:
            copier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await copier
        return answers

    async def _record_probe(self, svc: ServiceConfig, sandbox: Sandbox, path: str) -> probes.Answer:
        """What the template answers a probe of path: what the activator answers it with while nothing runs."""
        raw = await readiness.http_fetch(sandbox.connector(svc.port), svc.port, path, probes.ANSWER_LIMIT)
        answer = probes.parse_answer(raw) if raw is not None else None
        if answer is None:
            raise StartError(f"service '{svc.name}': the template did not answer GET {path} (probes) with HTTP within "
                             "5s; fix the probe's http path or remove it")
        log.info("service=%s probe %s recorded: %d %s, %d bytes", svc.name, path, answer.status, answer.reason,
                 len(answer.body))
        return answer

    async def _warm_up(self, svc: ServiceConfig, sandbox: Sandbox) -> None:
        """svc.warmup against the template, one request at a time; failures are counted, not fatal (a warm-up is
        an optimisation), unless every single one failed (then the paths are wrong: say so)."""
        w = svc.warmup
        t0, ok, total = time.monotonic(), 0, 0
        connect = sandbox.connector(svc.port)

        for _ in range(w.count):
            for path in w.http_paths:
                total += 1
                ok += await readiness.http_ok(connect, svc.port, path)
            if w.payload is not None:
                total += 1
                ok += await readiness.exchange(connect, w.payload.encode())
        log.info("service=%s warmed up: %d of %d requests answered in %.1fs", svc.name, ok, total,
                 time.monotonic() - t0)
        if total and not ok:
            raise StartError(f"service '{svc.name}': none of the {total} warm-up requests was answered; fix "
                             "'warmup' (paths, payload) or remove it")

    async def _wait_http(self, svc: ServiceConfig, sandbox: Sandbox, deadline: float) -> None:
        path = svc.readiness.http_path
        assert path is not None
        connect = sandbox.connector(svc.port)

        while time.monotonic() < deadline:
            if await readiness.http_ok(connect, svc.port, path):
                return
            await asyncio.sleep(0.1)
        raise StartError(
            f"service '{svc.name}': GET {path} on port {svc.port} did not answer 2xx/3xx within "
            f"{svc.readiness.timeout:g}s; fix 'readiness.http_path' or raise 'readiness.timeout'"
        )

    async def _wait_command(self, svc: ServiceConfig, sandbox: Sandbox, deadline: float, pid: int,
                            output: Path) -> None:
        """readiness.command in the template until it exits 0; what it printed goes to the template's log. Every
        run must be gone, with whatever it started, before the next (the dump takes every process along)."""
        command = svc.readiness.command
        assert command is not None
        args = ("/bin/sh", "-c", command[0]) if len(command) == 1 else command
        before = readiness.foreign(pid)
        status: int | None = None
        while time.monotonic() < deadline:
            out = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
            try:
                status = await sandbox.probe(args, timeout=min(svc.readiness.command_timeout,
                                                               max(0.1, deadline - time.monotonic())), output=out)
            finally:
                os.close(out)
            if not await readiness.wait_until(lambda: readiness.foreign(pid) <= before, timeout=2):
                raise StartError(f"service '{svc.name}': readiness.command left processes running in the template "
                                 f"({readiness.describe(readiness.foreign(pid) - before)}); make it wait for "
                                 "what it starts")
            if status == 0:
                return
            await asyncio.sleep(0.25)
        said = "it timed out" if status is None else f"its last exit status was {status}"
        raise StartError(
            f"service '{svc.name}': readiness.command did not succeed within {svc.readiness.timeout:g}s ({said}; "
            f"its output is in {self._log_hint(svc)}); fix it or raise 'readiness.timeout'")

    def _log_hint(self, svc: ServiceConfig) -> Path:
        return self.store.logs / f"{svc.name}-template.log"


def unshareable(svc: ServiceConfig) -> str:
    """Why svc's checkpoint cannot move between hosts ("" if it can)."""
    if svc.volumes:
        return (f"service '{svc.name}' has volumes, whose data does not move with a checkpoint (its memory may "
                "hold what it read of them); each host builds its own")
    return ""


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


class _Copy(asyncio.Protocol):
    """The template's output, written to its log as it arrives (no buffer in between that a cancel could drop)."""

    def __init__(self, out: int, dest: Path) -> None:
        self.out = out
        self.dest = dest
        self.writable = True
        self.ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def data_received(self, data: bytes) -> None:
        # Keep draining the pipe even when the log cannot be written (a full disk): an app blocked on a full
        # stdout pipe would never become ready.
        if not self.writable:
            return
        try:
            os.write(self.out, data)
        except OSError as e:
            self.writable = False
            log.warning("template output to %s stopped: %s", self.dest, e.strerror)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ended.done():
            self.ended.set_result(None)


async def _copy_pipe(fd: int, dest: Path) -> None:
    """Copy the template's stdout and stderr to dest until the app (and all that holds the pipe) exits, or until
    cancelled (it is ready, or it failed): then what it wrote that the loop has not read yet is taken too, so the
    log an error points to has everything the app said."""
    loop = asyncio.get_running_loop()
    pipe = os.fdopen(fd, "rb", buffering=0)
    out = open_private(dest)
    copy = _Copy(out, dest)
    try:
        transport, _ = await loop.connect_read_pipe(lambda: copy, pipe)
    except BaseException:
        pipe.close()
        os.close(out)
        raise
    try:
        await copy.ended
    finally:
        with contextlib.suppress(OSError):  # BlockingIOError: nothing left
            os.set_blocking(fd, False)
            while chunk := os.read(fd, 65536):
                copy.data_received(chunk)
        transport.close()
        os.close(out)
