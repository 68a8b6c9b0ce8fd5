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

Trust: the archive is checked (digests, a safe unpack), but its content is code and memory that CRIU restores as
root into an instance. Import only what you would run: a registry you trust like your image registry.
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
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from activator import __version__
from activator.config.model import Config, ServiceConfig
from activator.errors import ActivatorError
from activator.runtime import cgroups, userns

from . import ociarchive
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


class TransferError(ActivatorError):
    pass


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
        return cls(platform.machine(), os.uname().release, flags, "v1" if cgroups.v1_devices() else "v2",
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


def export(ck: Checkpoint, svc: ServiceConfig, image: ImageInfo, out: Path, scratch_near: Path) -> ociarchive.Image:
    """Blocking. Write the checkpoint as an OCI image archive at out."""
    if image.id != ck.origin.image_id:
        raise TransferError(f"service '{svc.name}': image '{svc.image}' is {image.id[:19]} now, the checkpoint was "
                            f"built from {ck.origin.image_id[:19]}; rebuild it (`activator checkpoint {svc.name}`) "
                            "before exporting")
    facts = HostFacts.here()
    record = ck.to_json()
    for k in ("dir", "image_rootfs"):
        record.pop(k)
    with ociarchive.scratch(scratch_near, f".build-export-{svc.name}-") as tmp:
        (tmp / "activator.json").write_text(json.dumps({
            "checkpoint": record, "host": asdict(facts), "activator": __version__, "exported": time.time()},
            indent=1))
        ociarchive.pack_tree(ck.diff, tmp / "rootfs-diff.tar")
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
        return ociarchive.write(out, layer, annotations, ref=tag(o, facts), arch=facts.oci_arch, created=created)


# --- import ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Imported:
    """A checkpoint image unpacked and checked, ready for store.install()."""

    service: str
    dir: Path  # below the scratch directory, on the store's filesystem
    checkpoint: Checkpoint
    moved_from: str  # the range it was dumped in, if it was moved into this host's ("" if not)


def service_of(image: ociarchive.Image, config: Config, name: str | None) -> ServiceConfig:
    """The service an image is for: its recorded name, or the one asked for."""
    engine = describe(image.annotations)["engine.name"]
    if engine != ENGINE:
        raise TransferError(f"{image.path}: a checkpoint image made by {engine or 'something other than activator'}"
                            "; activator serves only its own (`activator inspect` shows what it holds)")
    wanted = name or image.annotations.get(A + "container.name", "")
    return config.service(wanted)


def unpack(image: ociarchive.Image, svc: ServiceConfig, wanted: Origin, rootfs: Path, idmap: userns.IdMap | None,
           into: Path) -> Imported:
    """Blocking. Unpack and check an image for svc on this host, whose own build would have origin `wanted`,
    into the scratch directory `into` (inside the store's root)."""
    layer = into / "layer"
    layer.mkdir(mode=0o700)
    ociarchive.unpack_layer(image, layer, max_bytes=MAX_LAYER)
    try:
        meta = json.loads((layer / "activator.json").read_text())
        record, h = meta["checkpoint"], meta["host"]
        facts = HostFacts(str(h["arch"]), str(h["kernel"]), tuple(map(str, h["cpu_flags"])), str(h["cgroup"]),
                          str(h["distribution"]))
        theirs = Origin(**record["origin"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise TransferError(f"{image.path}: its activator.json is missing or unreadable ({type(e).__name__}); "
                            "not a checkpoint image activator made") from None
    if record.get("service") != svc.name and image.annotations.get(A + "container.name") == record.get("service"):
        record["service"] = svc.name  # imported under another service name, asked for by --service
    differ = [f"{k} {getattr(theirs, k)!s:.40} (here {getattr(wanted, k)!s:.40})"
              for k in theirs.differences(wanted) if k not in LOCAL_FIELDS]
    differ += HostFacts.here().missing(facts)
    if (theirs.userns == "host") != (wanted.userns == "host"):
        differ.append(f"userns {'host' if theirs.userns == 'host' else 'private'} "
                      f"(here {'host' if wanted.userns == 'host' else 'private'})")
    if differ:
        raise TransferError(f"{image.path}: this checkpoint of service '{svc.name}' cannot run here: "
                            f"{'; '.join(differ)}; `activator checkpoint {svc.name}` builds one on this host")
    final = into / "ck"
    final.mkdir(mode=0o700)
    os.rename(layer / "checkpoint", final / "criu")
    old = None if theirs.userns == "host" else userns.IdMap.parse(theirs.userns)
    owners = range(old.host, old.host + old.size) if old is not None else None
    ociarchive.unpack_tree(layer / "rootfs-diff.tar", final / "diff", owners)
    shutil.rmtree(layer)
    moved = ""
    if old is not None and idmap is not None and old != idmap:
        move_range(final, old, idmap)
        moved = str(old)
    make_private(final / "criu", idmap)
    record |= {"origin": asdict(wanted), "image_rootfs": str(rootfs)}
    ck = Checkpoint.from_json(record, final)
    ck = replace(ck, pages_bytes=sum(p.stat().st_size for p in ck.images.glob("pages-*.img")))
    return Imported(svc.name, final, ck, moved)


def move_range(ck_dir: Path, old: userns.IdMap, new: userns.IdMap) -> None:
    """Blocking. A checkpoint dumped in user namespace range `old` as if dumped in `new`: CRIU's userns image
    names the range (its only host ids: the process's own ids are the namespace's), the diff's files are owned
    by it."""
    from activator.runtime.preflight import require_pycriu

    pycriu = require_pycriu()
    for img in ck_dir.glob("criu/userns-*.img"):
        with open(img, "rb") as f:
            doc = pycriu.images.load(f)
        for entry in doc["entries"]:
            for which in ("uid_map", "gid_map"):
                for ext in entry.get(which, []):
                    if int(ext["lower_first"]) != old.host or int(ext["count"]) != old.size:
                        raise TransferError(f"{img}: maps {ext}, not the range {old} the checkpoint says")
                    ext["lower_first"] = new.host
        tmp = img.with_name(img.name + ".new")
        with open(tmp, "wb") as f:
            pycriu.images.dump(doc, f)
        os.replace(tmp, img)
    userns.move_tree(ck_dir / "diff", old, new)
