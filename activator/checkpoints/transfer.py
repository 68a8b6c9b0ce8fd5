"""A checkpoint as an OCI image: exported from one host, checked and installed on another.

The image has one layer, laid out as Podman's checkpoint archives are where they apply:
    checkpoint/        CRIU's image files
    rootfs-diff.tar    the template's filesystem changes (the overlay's upper dir: numeric owners, whiteouts)
    activator.json     the checkpoint record (store.py's meta.json without this host's paths) and the host it
                       was made on: architecture, kernel, CPU flags, cgroup version, distribution
and its manifest carries the `org.criu.checkpoint.*` annotations (checkpointctl's names) plus activator's own
(`org.activator.checkpoint.*`), so `skopeo inspect`, checkpointctl and `activator inspect` can all read it.

An import installs a checkpoint only if this host would have built exactly it: the same service definition,
image ID, CRIU, runc, kernel and seccomp filter (store.Origin, less the user namespace range), the same
architecture, and every CPU flag the exporting host had (a process dumped where AVX-512 was may use it). Else one
line says what differs; a local build stays possible. A checkpoint dumped in another user namespace range (each
host hands out its own) is moved into this host's range for the service: CRIU's userns image is rewritten and the
filesystem diff's owners shifted. The install is store.install(): a rename, running instances untouched.

Trust: nothing in an archive is believed because the archive says it. Before anything is unpacked, its manifest
digest must carry a signature by a key in settings.checkpoint_trust (signing.py). The record (activator.json)
carries only what this host cannot compute: when and how long the build took, and what the template answered
its probes (rebuilt within bounds). The process spec, seccomp filter, capabilities, /dev, external mounts,
listening ports and stop signal are derived here from the service definition and the image, exactly as a local
build derives them, and CRIU's own images are checked against them before any restore (dumpcheck.py).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import shutil
import tarfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from activator import __version__
from activator.config.document import Config
from activator.config.probes import probe_paths
from activator.config.service import ServiceConfig
from activator.core.probes import Answer
from activator.errors import ActivatorError
from activator.runtime import cgroups, userns
from activator.runtime.extmounts import DevEntry

from . import ociarchive, ocilayer, rootfsdiff, signing
from .images import ImageInfo
from .store import Checkpoint, Origin, make_private

log = logging.getLogger("activator")

ENGINE = "activator"
A = "org.criu.checkpoint."
OWN = "org.activator.checkpoint."
#: the most an imported layer may unpack to (a JVM's dump is tens of MiB; a bound keeps a hostile one off the disk)
MAX_LAYER = 16 * 2**30
#: Origin fields that are this host's own choice, not the checkpoint's (the range is moved on import)
LOCAL_FIELDS = ("userns",)
#: the checkpoint record's fields an archive carries: what this host cannot compute. Everything else of
#: store.Checkpoint (process spec, seccomp, /dev, external mounts, ports...) is derived by the importing host.
RECORD = ("service", "origin", "created", "build_seconds", "probe_answers")
#: an activator.json larger than this is not one (it holds a few recorded probe answers at most)
MAX_RECORD = 4 * 2**20


class TransferError(ActivatorError):
    pass


#: the registry tag of an image's signature, beside it (cosign keeps `sha256-DIGEST.sig` the same way)
SIG_SUFFIX = ".sig"


def _dev(name: str, kind: str, mode: int, major: int = 0, minor: int = 0, target: str = "") -> DevEntry:
    return DevEntry(name, kind, mode, os.makedev(major, minor), target)


#: The /dev runc makes for every container of ours: a tmpfs with its default devices (bound from the host in a
#: user namespace), the symlinks it adds and the mount points of the spec (pts, shm, mqueue). The image's own /dev
#: is hidden under that tmpfs, so it is the same for every template; an imported checkpoint gets this one, never
#: a list from the archive. tests/engine/test_signed_checkpoints.py checks it against a real template's snapshot.
RUNC_DEV = (
    _dev("fd", "link", 0o777, target="/proc/self/fd"), _dev("full", "chr", 0o666, 1, 7),
    _dev("mqueue", "dir", 0o1777), _dev("null", "chr", 0o666, 1, 3), _dev("ptmx", "link", 0o777, target="pts/ptmx"),
    _dev("pts", "dir", 0o755), _dev("random", "chr", 0o666, 1, 8), _dev("shm", "dir", 0o1777),
    _dev("stderr", "link", 0o777, target="/proc/self/fd/2"), _dev("stdin", "link", 0o777, target="/proc/self/fd/0"),
    _dev("stdout", "link", 0o777, target="/proc/self/fd/1"), _dev("tty", "chr", 0o666, 5, 0),
    _dev("urandom", "chr", 0o666, 1, 9), _dev("zero", "chr", 0o666, 1, 5),
)


@dataclass(frozen=True)
class HostFacts:
    """What a dump depends on beyond Origin: the CPU it ran on, and for the record the rest of the host."""

    arch: str
    kernel: str
    cpu_flags: tuple[str, ...]
    cgroup: str
    distribution: str

    @classmethod
    def here(cls) -> HostFacts:
        flags: tuple[str, ...] = ()
        try:
            for line in Path("/proc/cpuinfo").read_text().splitlines():
                if line.startswith(("flags", "Features")):
                    flags = tuple(sorted(set(line.partition(":")[2].split())))
                    break
        except OSError:
            pass
        return cls(platform.machine(), os.uname().release, flags, cgroups.version(),
                   _distribution())

    @property
    def oci_arch(self) -> str:
        return {"x86_64": "amd64", "aarch64": "arm64"}.get(self.arch, self.arch)

    def missing(self, there: HostFacts) -> list[str]:
        """What a checkpoint made on `there` needs that this host lacks."""
        out = []
        if there.arch != self.arch:
            out.append(f"architecture {there.arch} (here {self.arch})")
        lacking = sorted(set(there.cpu_flags) - set(self.cpu_flags))
        if lacking:
            out.append(f"CPU flags this host lacks: {', '.join(lacking[:8])}{' ...' if len(lacking) > 8 else ''}")
        return out


def _distribution() -> str:
    try:
        fields = dict(line.split("=", 1) for line in Path("/etc/os-release").read_text().splitlines() if "=" in line)
    except OSError:
        return ""
    return f"{fields.get('ID', '').strip(chr(34))} {fields.get('VERSION_ID', '').strip(chr(34))}".strip()


def tag(origin: Origin, facts: HostFacts) -> str:
    """The registry tag a host looks for: the same for every host that would build the same checkpoint (its
    Origin less the range, its architecture and CPU flags), so a fleet of like hosts shares one image and unlike
    ones never overwrite each other's."""
    key = {k: v for k, v in asdict(origin).items() if k not in LOCAL_FIELDS}
    key |= {"arch": facts.arch, "cpu_flags": list(facts.cpu_flags)}
    return "ck-" + hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:32]


#: Podman before 4.x's move to checkpointctl's names: io.podman.annotations.checkpoint.* (Debian 12's 4.3.1)
PODMAN = "io.podman.annotations.checkpoint."
#: checkpointctl's key -> Podman 4.3's, where they differ
PODMAN_KEYS = {"container.name": "name", "cgroup.version": "cgroups.version"}
DESCRIBED = ("engine.name", "engine.version", "container.name", "rootfsImageName", "rootfsImageID", "runtime.name",
             "runtime.version", "criu.version", "host.arch", "host.kernel", "cgroup.version", "distribution.name",
             "distribution.version")


def describe(annotations: dict[str, str]) -> dict[str, str]:
    """A checkpoint image's origin from its annotations, whichever engine and naming made it ("" where unsaid)."""
    out = {}
    for key in DESCRIBED:
        value = annotations.get(A + key) or annotations.get(PODMAN + PODMAN_KEYS.get(key, key), "")
        out[key] = value.strip().splitlines()[0] if value.strip() else ""
    if not out["engine.name"] and annotations.get(PODMAN + "podman.version"):
        out["engine.name"], out["engine.version"] = "podman", annotations[PODMAN + "podman.version"]
    return out


# --- export ---------------------------------------------------------------------------------------------------


def export(ck: Checkpoint, svc: ServiceConfig, image: ImageInfo, out: Path, scratch_near: Path,
           key: Ed25519PrivateKey | None = None) -> ociarchive.Image:
    """Blocking. Write the checkpoint as an OCI image archive at out, signed with key if there is one."""
    if image.id != ck.origin.image_id:
        raise TransferError(f"service '{svc.name}': image '{svc.image}' is {image.id[:19]} now, the checkpoint was "
                            f"built from {ck.origin.image_id[:19]}; rebuild it (`activator checkpoint {svc.name}`) "
                            "before exporting")
    facts = HostFacts.here()
    record = {k: v for k, v in ck.to_json().items() if k in RECORD}
    with ociarchive.scratch(scratch_near, f".build-export-{svc.name}-") as tmp:
        (tmp / "activator.json").write_text(json.dumps({
            "checkpoint": record, "host": asdict(facts), "activator": __version__, "exported": time.time()},
            indent=1))
        rootfsdiff.pack_tree(ck.diff, tmp / "rootfs-diff.tar")
        layer = tmp / "layer.tar"
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
            t.add(tmp / "activator.json", "activator.json", filter=ociarchive.root_owned)
            t.add(tmp / "rootfs-diff.tar", "rootfs-diff.tar", filter=ociarchive.root_owned)
            t.add(ck.images, "checkpoint", filter=ociarchive.root_owned)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ck.created))
        o = ck.origin
        annotations = {
            A + "engine.name": ENGINE, A + "engine.version": __version__,
            A + "container.name": svc.name,
            A + "rootfsImageName": svc.image, A + "rootfsImageID": o.image_id,
            A + "rootfsImageUserRequested": svc.image,
            **({A + "rootfsImageSha": image.digest.partition("@")[2]} if "@" in image.digest else {}),
            A + "runtime.name": "runc", A + "runtime.version": o.runc,
            A + "criu.version": o.criu,
            A + "host.arch": facts.arch, A + "host.kernel": facts.kernel,
            A + "cgroup.version": facts.cgroup,
            A + "distribution.name": facts.distribution.partition(" ")[0],
            A + "distribution.version": facts.distribution.partition(" ")[2],
            OWN + "format": str(o.format), OWN + "fingerprint": o.service_fingerprint,
            OWN + "seccomp": o.seccomp, OWN + "userns": o.userns,
            OWN + "cpu-flags": hashlib.sha256(" ".join(facts.cpu_flags).encode()).hexdigest()[:16],
            OWN + "pages-bytes": str(ck.pages_bytes),
            "org.opencontainers.image.created": created,
        }

        def sealed(digest: str) -> dict[str, str]:
            return signing.annotation(signing.sign(key, digest)) if key is not None else {}

        return ociarchive.write(out, layer, annotations, ref=tag(o, facts), arch=facts.oci_arch, created=created,
                                seal=sealed)


def seal(archive: Path, sig: signing.Signature) -> ociarchive.Image:
    """Blocking. Put a signature into an archive's envelope (its index's annotations of the image), which the
    manifest digest does not cover; written as ociarchive writes (reseal: a new O_EXCL|O_NOFOLLOW file in a
    directory safe_dir accepts, renamed over the old one)."""
    image = ociarchive.read(archive)
    if image.digest != sig.manifest:
        raise signing.SignatureError(f"{archive}: the signature is for image {sig.manifest[:19]}, not this one")
    return ociarchive.reseal(archive, signing.annotation(sig))


def signature_image(sig: signing.Signature, out: Path, scratch_near: Path) -> ociarchive.Image:
    """Blocking. A tiny image that carries an image's signature in its manifest's annotations, to be pushed as
    TAG.sig beside it (a registry keeps manifests, not an archive's index)."""
    with ociarchive.scratch(scratch_near, ".build-sig-") as tmp:
        (tmp / "signature.json").write_text(sig.to_text())
        layer = tmp / "layer.tar"
        with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
            t.add(tmp / "signature.json", "signature.json", filter=ociarchive.root_owned)
        created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        return ociarchive.write(out, layer, signing.annotation(sig), ref="signature", arch=HostFacts.here().oci_arch,
                                created=created)


def signature_of(archive: Path, where: str) -> signing.Signature:
    """Blocking. The signature a pulled TAG.sig image carries (checked by the caller against the image's digest)."""
    sig = signing.of_annotations(ociarchive.read(archive).annotations, where + SIG_SUFFIX)
    if sig is None:
        raise signing.SignatureError(f"{where}{SIG_SUFFIX}: not a signature image; refused")
    return sig


# --- import ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Imported:
    """A checkpoint image unpacked and checked against this host, ready for the importer to derive the rest of its
    record (exchange.import_archive) and install it."""

    service: str
    dir: Path  # below the scratch directory, on the store's filesystem: criu/ and diff/
    created: float
    build_seconds: float
    probe_answers: tuple[tuple[str, Answer], ...]
    moved_from: str  # the range it was dumped in, if it was moved into this host's ("" if not)

    @property
    def images(self) -> Path:
        return self.dir / "criu"


def service_of(image: ociarchive.Image, config: Config, name: str | None) -> ServiceConfig:
    """The service an image is for: its recorded name, or the one asked for."""
    engine = describe(image.annotations)["engine.name"]
    if engine != ENGINE:
        raise TransferError(f"{image.path}: a checkpoint image made by {engine or 'something other than activator'}"
                            "; activator serves only its own (`activator inspect` shows what it holds)")
    wanted = name or image.annotations.get(A + "container.name", "")
    try:
        return config.service(wanted)
    except ActivatorError as e:
        if name:
            raise
        raise TransferError(f"{e}; it was made for service '{wanted[:40]}': import it as one of these on purpose "
                            "with --service NAME") from None


def _record(layer: Path, where: Path) -> tuple[dict[str, Any], HostFacts, Origin]:
    try:
        f = layer / "activator.json"
        if f.is_symlink() or not f.is_file() or f.stat().st_size > MAX_RECORD:
            raise ValueError("not a small regular file")
        meta = json.loads(f.read_text())
        record, h = meta["checkpoint"], meta["host"]
        facts = HostFacts(str(h["arch"]), str(h["kernel"]), tuple(map(str, h["cpu_flags"])), str(h["cgroup"]),
                          str(h["distribution"]))
        o = record["origin"]
        if not isinstance(o, dict) or set(o) - {f.name for f in fields(Origin)}:
            raise ValueError("unknown origin fields")
        fixed: dict[str, Any] = {k: (int(v) if k == "format" else str(v)) for k, v in o.items()}
        theirs = Origin(**fixed)
        for k in ("created", "build_seconds"):
            if not isinstance(record.get(k), int | float) or not 0 <= record[k] < 2**40:
                raise ValueError(k)
    except (OSError, ValueError, KeyError, TypeError, RecursionError, OverflowError) as e:
        raise TransferError(f"{where}: its activator.json is missing or unreadable ({type(e).__name__}); "
                            "not a checkpoint image activator made") from None
    return record, facts, theirs


def unpack(image: ociarchive.Image, svc: ServiceConfig, wanted: Origin, idmap: userns.IdMap | None,
           into: Path) -> Imported:
    """Blocking. Unpack and check an image for svc on this host, whose own build would have origin `wanted`,
    into the scratch directory `into` (inside the store's root). The image's signature was verified before."""
    layer = into / "layer"
    layer.mkdir(mode=0o700)
    ocilayer.unpack_layer(image, layer, max_bytes=MAX_LAYER)
    record, facts, theirs = _record(layer, image.path)
    differ = [f"{k} {getattr(theirs, k)!s:.40} (here {getattr(wanted, k)!s:.40})"
              if k != "service_fingerprint" else "the service's definition (a key that shapes the checkpoint: image, "
              "command, environment, user, capabilities, seccomp, ... differs from the builder's file)"
              for k in theirs.differences(wanted) if k not in LOCAL_FIELDS]
    differ += HostFacts.here().missing(facts)
    if (theirs.userns == "host") != (wanted.userns == "host"):
        differ.append(f"userns {'host' if theirs.userns == 'host' else 'private'} "
                      f"(here {'host' if wanted.userns == 'host' else 'private'})")
    old: userns.IdMap | None = None
    if theirs.userns != "host":
        try:
            old = userns.IdMap.parse(theirs.userns)
            if not 0 < old.host < 2**32 - old.size:
                raise ValueError(old)
        except ValueError:
            old = None
            differ.append(f"userns range {theirs.userns[:40]!r} is not a range")
        # Ranges are handed out in one size: a larger claimed range would let owners from a neighbour's range
        # through the diff's owner check and move them into this service's.
        if old is not None and idmap is not None and old.size != idmap.size:
            differ.append(f"userns range of {old.size} ids (this host hands out {idmap.size})")
    if differ:
        raise TransferError(f"{image.path}: this checkpoint of service '{svc.name}' cannot run here: "
                            f"{'; '.join(differ)}; `activator checkpoint {svc.name}` builds one on this host")
    final = into / "ck"
    final.mkdir(mode=0o700)
    os.rename(layer / "checkpoint", final / "criu")
    owners = range(old.host, old.host + old.size) if old is not None else None
    rootfsdiff.unpack_tree(layer / "rootfs-diff.tar", final / "diff", owners)
    shutil.rmtree(layer)
    moved = ""
    if old is not None and idmap is not None:
        # Always, even when the archive claims this host's own range (which is predictable): the rewrite also
        # checks that CRIU's userns image maps exactly the range the record names, and nothing else.
        move_range(final, old, idmap)
        moved = str(old) if old != idmap else ""
    make_private(final / "criu", idmap)
    answers = []
    for item in record.get("probe_answers") or ():
        try:
            path, answer = item
            if isinstance(path, str) and path in probe_paths(svc.probes):
                answers.append((path, Answer.from_untrusted(answer)))
        except (ValueError, TypeError):
            raise TransferError(f"{image.path}: a recorded probe answer is malformed; not a checkpoint image "
                                "activator made") from None
    return Imported(svc.name, final, float(record["created"]), float(record["build_seconds"]), tuple(answers), moved)


def move_range(ck_dir: Path, old: userns.IdMap, new: userns.IdMap) -> None:
    """Blocking. A checkpoint dumped in user namespace range `old` as if dumped in `new`: CRIU's userns image
    names the range (its only host ids: the process's own ids are the namespace's), the diff's files are owned
    by it. Anything but exactly one extent 0 -> old.host of old.size ids per map is refused."""
    from activator.runtime.preflight import require_pycriu

    pycriu = require_pycriu()
    found = sorted(ck_dir.glob("criu/userns-*.img"))
    if not found:
        raise TransferError(f"{ck_dir.name}: the dump has no user namespace image, but its record names range {old}")
    for img in found:
        if img.stat().st_size > 65536:
            raise TransferError(f"{img.name}: {img.stat().st_size} bytes, too large for a user namespace image")
        try:
            with open(img, "rb") as f:
                doc = pycriu.images.load(f)
            entries = doc["entries"]
        except Exception as e:  # pycriu raises whatever its decoder meets in a crafted file
            raise TransferError(f"{img.name}: not a readable CRIU image ({type(e).__name__})") from None
        for entry in entries:
            for which in ("uid_map", "gid_map"):
                exts = entry.get(which, [])
                if len(exts) != 1 or int(exts[0].get("first", 0)) != 0 or int(exts[0]["lower_first"]) != old.host \
                        or int(exts[0]["count"]) != old.size:
                    raise TransferError(f"{img.name}: {which} is {str(exts)[:120]}, not the range {old} the "
                                        "checkpoint says")
                exts[0]["lower_first"] = new.host
        tmp = img.with_name(img.name + ".new")
        with open(tmp, "wb") as f:
            pycriu.images.dump(doc, f)
        os.replace(tmp, img)
    if old != new:
        userns.move_tree(ck_dir / "diff", old, new)
