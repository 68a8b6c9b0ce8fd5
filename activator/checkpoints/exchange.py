"""Checkpoints between hosts: exported as signed OCI image archives, imported (checked against what this host
would build before anything of them is used), pulled from and pushed to the checkpoint registry.

The image format and its checks are transfer.py's and ociarchive.py's, signatures signing.py's, the registry
registry.py's (skopeo); this is their order and the host's side of it: what a build would make here (the
builder's), the store an import installs into, and the counts the daemon keeps.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any, Protocol

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activator.config.service import ServiceConfig
from activator.core import liveview
from activator.errors import ActivatorError, CheckpointError
from activator.runtime import extmounts, seccompref, userns
from activator.runtime.runc import Runc
from activator.runtime.spec import capability_set

from . import dumpcheck, maphazard, ociarchive, recipe, signing, transfer
from .images import ImageInfo, ImageSource
from .registry import Registry
from .store import Checkpoint, CheckpointStore, Origin, listening_addresses, listening_ports, pages_bytes

# Builds log under one name wherever their code lives (operators grep for it).
log = logging.getLogger("activator.builder")


class Builds(Protocol):
    """What the exchange needs of the builder (builder.py): what a build of a service would be made from here,
    its store, and the image unpacking it shares."""

    store: CheckpointStore
    images: ImageSource
    runc: Runc
    instances_dir: Path

    async def wanted(self, svc: ServiceConfig) -> tuple[Origin, ImageInfo, dict[str, Any] | None]: ...
    async def current(self, svc: ServiceConfig) -> Checkpoint | None: ...
    def idmap(self, svc: ServiceConfig) -> userns.IdMap | None: ...
    async def unpack_image(self, svc: ServiceConfig, image: ImageInfo) -> Path: ...
    async def prune_images(self) -> list[Path]: ...


class CheckpointExchange:
    """Moves checkpoints in and out of this host. Owns nothing long-lived: each transfer's scratch directory is
    gone when it returns."""

    def __init__(self, builds: Builds) -> None:
        self.builds = builds
        self.registry: Registry | None = None  # settings.checkpoint_registry (open_host sets it)
        # settings.checkpoint_trust (open_host loads it): who may sign what this host imports, and its own key
        self.trust = signing.Trust({})
        self.sign_key: Ed25519PrivateKey | None = None
        self.on_transfer: Callable[[str, str, str], None] | None = None  # (service, pull|push, ok|absent|failed)

    def pulls(self, svc: ServiceConfig) -> bool:
        """Is a checkpoint of svc looked for in the registry before one is built here?"""
        return self.registry is not None and self.registry.settings.pull and not recipe.unshareable(svc)

    def registry_ref(self, svc: ServiceConfig, wanted: Origin) -> str:
        assert self.registry is not None
        return self.registry.ref(svc.name, transfer.tag(wanted, transfer.HostFacts.here()))

    async def export(self, svc: ServiceConfig, out: Path, key: Ed25519PrivateKey | None = None) -> ociarchive.Image:
        """Write the service's current checkpoint as an OCI image archive, signed with key if given."""
        if why := recipe.unshareable(svc):
            raise CheckpointError(why)
        ck = await self.builds.current(svc)
        if ck is None:
            raise CheckpointError(f"service '{svc.name}' has no current checkpoint here; build one with `activator "
                                  f"checkpoint {svc.name}` first")
        image = await asyncio.to_thread(self.builds.images.resolve, svc.image, svc.name)
        return await asyncio.to_thread(transfer.export, ck, svc, image, out, self.builds.store.root, key)

    async def import_archive(self, archive: Path, svc: ServiceConfig, *, source: str = "",
                             signature: signing.Signature | None = None, rename: bool = False) -> Checkpoint:
        """Check an OCI checkpoint image against what this host would build for svc and install it (running
        instances carry on with theirs). One line saying what differs if it cannot run here.

        In this order, each before the next touches anything: the signature over the manifest digest (the
        archive's own, or `signature`, pulled beside it), the blobs' digests, the record's origin against this
        host's, the layer's members; then the record is derived here as a build derives it, and CRIU's images
        are checked against it."""
        if why := recipe.unshareable(svc):
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
        wanted, image, filt = await self.builds.wanted(svc)
        rootfs = self.builds.store.image_rootfs(image.short_id)
        idmap = await asyncio.to_thread(self.builds.idmap, svc)
        with ociarchive.scratch(self.builds.store.root, f".build-import-{svc.name}-") as tmp:
            got = await asyncio.to_thread(transfer.unpack, image_doc, svc, wanted, idmap, tmp)
            unpacked_here = not rootfs.is_dir()
            if unpacked_here:
                t0 = time.monotonic()
                await self.builds.unpack_image(svc, image)
                log.info("service=%s image unpacked in %.2fs", svc.name, time.monotonic() - t0)
            try:
                derived = await asyncio.to_thread(self._derive, svc, image, rootfs, wanted, filt, got)
                derived = replace(derived, provenance=f"imported {time.strftime('%Y-%m-%d %H:%M:%S')} from "
                                                      f"{where[:200]}: image {image_doc.digest}, {signer}")
            except BaseException:
                if unpacked_here:  # a refused image leaves nothing, not even the image it would have used
                    await self.builds.prune_images()
                raise
            ck = await asyncio.to_thread(self.builds.store.install, got.dir, derived)
        log.info("service=%s checkpoint imported from %s (%s, %s, %s of pages%s)", svc.name, where,
                 image_doc.digest[:19], signer, liveview.size(ck.pages_bytes),
                 f"; moved from user namespace range {got.moved_from} to {idmap}" if got.moved_from else "")
        return ck

    def _derive(self, svc: ServiceConfig, image: ImageInfo, rootfs: Path, origin: Origin,
                filt: dict[str, Any] | None, got: transfer.Imported) -> Checkpoint:
        """Blocking. An imported dump's record, made here from the service and the image as a build makes it
        (nothing the archive says about the process, its sandbox or its mounts is used), and the dump checked
        against it."""
        process = recipe.process(svc, image, rootfs)
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
            pages_bytes=pages_bytes(got.images), seccomp=filt, kernel_path=recipe.kernel_path(svc, addresses),
            external=extmounts.mounts(), dev=transfer.RUNC_DEV, stop_signal=image.stop_signal or "SIGTERM",
            writes_volumes=(), probe_answers=got.probe_answers,
        )
        self._check_dump(ck, svc)
        try:  # after the check: pycriu has read every image of it once without failing
            hazard = maphazard.find(ck.images, ck.layers)
        except Exception as e:  # whatever pycriu's decoder raises on a crafted file: never mapped
            hazard = ("its dump could not be read to look for an allocator that breaks under map "
                      f"({type(e).__name__})")
        return replace(ck, map_hazard=hazard)

    def _check_dump(self, ck: Checkpoint, svc: ServiceConfig) -> None:
        """Blocking. CRIU's images of an imported checkpoint held against what a template of svc, dumped on this
        host, would hold (dumpcheck.py): one line naming the image and field for anything more."""
        try:
            filters = seccompref.reference(ck.seccomp, self.builds.instances_dir.parent, self.builds.runc.binary)
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
        with ociarchive.scratch(self.builds.store.root, f".build-pull-{svc.name}-") as tmp:
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
        wanted, _image, _filt = await self.builds.wanted(svc)
        ref = self.registry_ref(svc, wanted)
        started = time.monotonic()
        if self.sign_key is None and not self.trust.insecure_unsigned:
            raise CheckpointError(f"service '{svc.name}': pushing needs settings.checkpoint_trust.sign_key (hosts "
                                  "that pull refuse unsigned checkpoints)")
        with ociarchive.scratch(self.builds.store.root, f".build-push-{svc.name}-") as tmp:
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
        return self.registry is not None and self.registry.settings.push and not recipe.unshareable(svc)

    def _transferred(self, svc: ServiceConfig, direction: str, result: str) -> None:
        if self.on_transfer is not None:
            self.on_transfer(svc.name, direction, result)
