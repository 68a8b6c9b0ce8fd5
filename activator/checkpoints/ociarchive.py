"""OCI image archives of one layer: written, read back with every digest checked, and unpacked safely.

An archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) in one tar: what skopeo's
`oci-archive:` transport reads and writes, so a registry is reached by `skopeo copy` without any format of ours.
A checkpoint image is one such image whose single layer holds the checkpoint files and whose manifest carries
the `org.criu.checkpoint.*` annotations Podman, CRI-O and checkpointctl use (transfer.py fills them in).

Nothing here trusts the archive: index, manifest, config and layer are each checked against the digest that
names them before they are used, the layer is unpacked by tarfile's `data` filter (no absolute names, no `..`,
no links out, no device nodes), and sizes are bounded. Blocking: callers run these in a thread.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import json
import os
import shutil
import subprocess
import tarfile
import tempfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from activator.errors import ActivatorError

MANIFEST = "application/vnd.oci.image.manifest.v1+json"
CONFIG = "application/vnd.oci.image.config.v1+json"
INDEX = "application/vnd.oci.image.index.v1+json"
LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
LAYER_TAR = "application/vnd.oci.image.layer.v1.tar"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"
REF_NAME = "org.opencontainers.image.ref.name"
#: index, manifest and config are small: anything larger is not an image of this kind
SMALL_BLOB = 4 * 2**20
CHUNK = 2**20


class ArchiveError(ActivatorError):
    pass


@dataclass(frozen=True)
class Blob:
    media_type: str
    digest: str
    size: int

    def descriptor(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": self.digest, "size": self.size}


@dataclass(frozen=True)
class Image:
    """An archive's image as read and checked: its manifest's annotations, config and layers."""

    path: Path
    digest: str  # of the manifest: the image's identity, as a registry names it
    ref: str  # the index's ref.name, if any
    annotations: dict[str, str]
    config: dict[str, Any]
    layers: tuple[Blob, ...]
    members: dict[str, tarfile.TarInfo] = field(repr=False, default_factory=dict)
    envelope: dict[str, str] = field(default_factory=dict)  # the index's annotations of it (a signature), unchecked

    @property
    def size(self) -> int:
        return sum(b.size for b in self.layers)


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def write(out: Path, layer_tar: Path, annotations: dict[str, str], *, ref: str, arch: str,
          created: str, labels: dict[str, str] | None = None,
          seal: Callable[[str], dict[str, str]] | None = None) -> Image:
    """Write an archive of one image whose one layer is layer_tar (uncompressed; compressed here with zstd),
    atomically (a temporary name beside `out`, then a rename). seal: given the manifest digest, annotations for
    the index's descriptor of it (a signature: outside what the digest covers)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".oci-", dir=out.parent) as tmp:
        blobs = Path(tmp, "blobs", "sha256")
        blobs.mkdir(parents=True)
        diff_id = _sha256_file(layer_tar)
        packed = Path(tmp, "layer.zst")
        _run(["zstd", "-q", "-T0", "-3", "-o", str(packed), str(layer_tar)], "compressing the layer")
        layer = Blob(LAYER_ZSTD, _sha256_file(packed), packed.stat().st_size)
        os.rename(packed, blobs / layer.digest.split(":")[1])

        def put(doc: dict[str, Any], media_type: str) -> Blob:
            data = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
            b = Blob(media_type, "sha256:" + hashlib.sha256(data).hexdigest(), len(data))
            (blobs / b.digest.split(":")[1]).write_bytes(data)
            return b

        config = put({"architecture": arch, "os": "linux", "created": created,
                      "config": {"Labels": labels or {}},
                      "rootfs": {"type": "layers", "diff_ids": [diff_id]},
                      "history": [{"created": created, "created_by": "activator checkpoint export"}]}, CONFIG)
        manifest = put({"schemaVersion": 2, "mediaType": MANIFEST, "config": config.descriptor(),
                        "layers": [layer.descriptor()], "annotations": annotations}, MANIFEST)
        Path(tmp, "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
        Path(tmp, "index.json").write_text(json.dumps({
            "schemaVersion": 2, "mediaType": INDEX,
            "manifests": [manifest.descriptor() | {"annotations": {REF_NAME: ref} | (seal(manifest.digest)
                                                                                    if seal else {})}]}))
        partial = out.with_name(f".{out.name}.partial")
        with tarfile.open(partial, "w", format=tarfile.PAX_FORMAT) as t:
            for name in ("oci-layout", "index.json", "blobs"):
                t.add(Path(tmp, name), arcname=name, filter=root_owned)
        os.chmod(partial, 0o600)  # the app's memory is in it
        os.rename(partial, out)
    return read(out)


def reseal(path: Path, envelope: dict[str, str]) -> Image:
    """Rewrite an archive with these annotations added to its index's descriptor of the image (a signature added
    after export). The image itself is untouched: every blob is copied as it is and checked again on read."""
    image = read(path)
    with tarfile.open(path, "r:") as t:
        f = t.extractfile(image.members["index.json"])
        assert f is not None
        index = json.loads(f.read(SMALL_BLOB))
        desc = index["manifests"][0]
        desc["annotations"] = {**(desc.get("annotations") or {}), **envelope}
        data = json.dumps(index).encode()
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as out:
                for m in t.getmembers():
                    if m.name.removeprefix("./") == "index.json":
                        info = tarfile.TarInfo("index.json")
                        info.size, info.mode, info.mtime = len(data), 0o644, m.mtime
                        out.addfile(info, io.BytesIO(data))
                    elif m.isfile():
                        out.addfile(m, t.extractfile(m))
                    else:
                        out.addfile(m)
            os.chmod(tmp, 0o600)
            os.rename(tmp, path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
    return read(path)


def root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A tarfile filter: members owned by root, without names (the exporting host's ids mean nothing elsewhere)."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def read(path: Path) -> Image:
    """The archive's (first) image, with its index, manifest and config checked against their digests."""
    try:
        with tarfile.open(path, "r:") as t:
            members = {m.name.removeprefix("./"): m for m in t.getmembers() if m.isfile()}

            def blob(digest: str, limit: int = SMALL_BLOB) -> bytes:
                algo, _, hexd = digest.partition(":")
                m = members.get(f"blobs/{algo}/{hexd}")
                if algo != "sha256" or m is None:
                    raise ArchiveError(f"{path}: blob {digest[:24]} is missing")
                if m.size > limit:
                    raise ArchiveError(f"{path}: blob {digest[:24]} is {m.size} bytes, more than {limit}")
                f = t.extractfile(m)
                assert f is not None
                data = f.read()
                if "sha256:" + hashlib.sha256(data).hexdigest() != digest:
                    raise ArchiveError(f"{path}: blob {digest[:24]} does not match its digest (corrupt or altered)")
                return data

            if "index.json" not in members:
                raise ArchiveError(f"{path}: not an OCI image archive (no index.json)")
            f = t.extractfile(members["index.json"])
            assert f is not None
            index = json.loads(f.read(SMALL_BLOB))
            descs = index.get("manifests") or []
            if not descs:
                raise ArchiveError(f"{path}: the archive holds no image")
            desc = descs[0]
            manifest = json.loads(blob(desc["digest"]))
            config = json.loads(blob(manifest["config"]["digest"]))
            layers = tuple(Blob(d.get("mediaType", ""), d["digest"], int(d["size"])) for d in manifest["layers"])
            return Image(path, desc["digest"], (desc.get("annotations") or {}).get(REF_NAME, ""),
                         {str(k): str(v) for k, v in (manifest.get("annotations") or {}).items()}, config, layers,
                         members, {str(k): str(v) for k, v in (desc.get("annotations") or {}).items()})
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError, AttributeError) as e:
        if isinstance(e, ArchiveError):
            raise
        raise ArchiveError(f"{path}: not a readable OCI image archive ({type(e).__name__}: {e})") from None


def unpack_layer(image: Image, dest: Path, *, max_bytes: int) -> None:
    """Unpack the image's one layer into dest (an empty directory), its digest and diff_id checked on the way."""
    if len(image.layers) != 1:
        raise ArchiveError(f"{image.path}: a checkpoint image has one layer, this one has {len(image.layers)}")
    layer = image.layers[0]
    diff_ids = image.config.get("rootfs", {}).get("diff_ids", [])
    with tempfile.TemporaryDirectory(prefix=".layer-", dir=dest.parent) as tmp:
        plain = Path(tmp, "layer.tar")
        with tarfile.open(image.path, "r:") as t:
            m = image.members.get("blobs/sha256/" + layer.digest.partition(":")[2])
            src = t.extractfile(m) if m is not None else None
            if src is None:
                raise ArchiveError(f"{image.path}: layer {layer.digest[:24]} is missing")
            _decompress(src, layer.media_type, plain, max_bytes, image.path, layer.digest)
        if diff_ids and _sha256_file(plain) != diff_ids[0]:
            raise ArchiveError(f"{image.path}: the unpacked layer does not match the config's diff_id")
        with tarfile.open(plain, "r:") as t:
            t.extractall(dest, filter="data")


def _decompress(src: IO[bytes], media_type: str, out: Path, max_bytes: int, where: Path, digest: str) -> None:
    """Copy the compressed blob through its decompressor into out, checking the compressed bytes' digest (before
    anything the decompressor says: an altered blob is refused as altered)."""
    h = hashlib.sha256()
    if media_type.endswith("zstd"):
        with open(out, "wb") as dst:
            proc = subprocess.Popen(["zstd", "-q", "-d", "-c"], stdin=subprocess.PIPE, stdout=dst,
                                    stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stderr is not None
        with contextlib.suppress(BrokenPipeError):  # zstd gave up: its status and stderr say why
            while chunk := src.read(CHUNK):
                h.update(chunk)
                proc.stdin.write(chunk)
        with contextlib.suppress(BrokenPipeError):
            proc.stdin.close()
        err = proc.stderr.read(65536)
        proc.stderr.close()
        proc.wait(timeout=600)
        _check_digest(h, digest, where)
        if proc.returncode:
            raise ArchiveError(f"{where}: the layer does not decompress: {err.decode(errors='replace').strip()}")
    elif media_type.endswith(("gzip", "tar")):
        with open(out, "wb") as dst:  # hashed as read, then inflated
            hashed = _Hashing(src, h)
            stream: Any = gzip.GzipFile(fileobj=hashed) if media_type.endswith("gzip") else hashed
            copied, broken = 0, ""
            try:
                while chunk := stream.read(CHUNK):
                    copied += len(chunk)
                    if copied > max_bytes:
                        raise ArchiveError(f"{where}: the layer unpacks to more than {max_bytes} bytes")
                    dst.write(chunk)
            except (OSError, EOFError, zlib.error) as e:
                broken = str(e)
            while hashed.read(CHUNK):  # a gzip trailer or padding is part of the digest too
                pass
        _check_digest(h, digest, where)
        if broken:
            raise ArchiveError(f"{where}: the layer does not decompress: {broken}")
    else:
        raise ArchiveError(f"{where}: layer media type '{media_type}' is not one activator reads")
    if out.stat().st_size > max_bytes:
        raise ArchiveError(f"{where}: the layer unpacks to more than {max_bytes} bytes")


def _check_digest(h: Any, digest: str, where: Path) -> None:
    if "sha256:" + h.hexdigest() != digest:
        raise ArchiveError(f"{where}: layer {digest[:24]} does not match its digest (corrupt or altered)")


class _Hashing(io.RawIOBase):
    def __init__(self, src: IO[bytes], h: Any) -> None:
        self.src, self.h = src, h

    def readable(self) -> bool:
        return True

    def read(self, n: int = -1) -> bytes:
        data = self.src.read(n)
        self.h.update(data)
        return data


def _run(argv: list[str], what: str) -> None:
    try:
        p = subprocess.run(argv, capture_output=True, timeout=900)
    except FileNotFoundError:
        raise ArchiveError(f"{what} needs `{argv[0]}`, which is not installed; run 'make setup' (or apt-get "
                           f"install {argv[0]})") from None
    if p.returncode:
        raise ArchiveError(f"{what} failed: {p.stderr.decode(errors='replace').strip()[:300]}")


# --- the root filesystem diff, a tar inside the layer (as Podman's rootfs-diff.tar) ---------------------------


def pack_tree(src: Path, out: Path) -> None:
    """Tar a directory with numeric owners and the overlay's xattrs (an opaque directory, a whiteout device)."""
    _run(["tar", "--create", "--file", str(out), "--numeric-owner", "--xattrs", "--xattrs-include=trusted.overlay.*",
          "--acls", "-C", str(src), "."], "packing the filesystem diff")


def unpack_tree(archive: Path, dest: Path, owners: range | None) -> None:
    """Unpack a diff packed by pack_tree into dest, after checking every member: names stay inside dest (no
    absolute names, no `..`, nothing below a symlink of the archive), hard links point inside, devices are only
    overlay whiteouts (char 0:0), and with `owners` every uid and gid is in that range (the exporter's user
    namespace): an archive from elsewhere cannot plant a host-root-owned or set-user-ID file."""
    links: set[str] = set()
    with tarfile.open(archive, "r:") as t:
        for m in t:
            name = os.path.normpath(m.name)
            if name == ".":
                continue
            where = f"{archive.name}: {m.name[:100]}"
            if os.path.isabs(m.name) or name.startswith(".."):
                raise ArchiveError(f"{where}: a name outside the tree")
            if any(name == s or name.startswith(s + "/") for s in links):
                raise ArchiveError(f"{where}: below a symbolic link of the archive")
            if m.issym():
                links.add(name)
            elif m.islnk():
                target = os.path.normpath(m.linkname)
                if os.path.isabs(m.linkname) or target.startswith(".."):
                    raise ArchiveError(f"{where}: a hard link out of the tree")
            elif m.ischr():
                if (m.devmajor, m.devminor) != (0, 0):
                    raise ArchiveError(f"{where}: a device node (only overlay whiteouts are allowed)")
            elif not (m.isreg() or m.isdir() or m.isfifo()):
                raise ArchiveError(f"{where}: an entry of a kind a filesystem diff does not hold")
            if owners is not None and (m.uid not in owners or m.gid not in owners):
                raise ArchiveError(f"{where}: owned by {m.uid}:{m.gid}, outside the exporter's user namespace "
                                   f"({owners.start}-{owners.stop - 1})")
    dest.mkdir(mode=0o755, exist_ok=True)
    _run(["tar", "--extract", "--file", str(archive), "--numeric-owner", "--same-permissions", "--xattrs",
          "--xattrs-include=trusted.overlay.*", "--acls", "-C", str(dest)],
         "unpacking the filesystem diff")


@contextlib.contextmanager
def scratch(near: Path, prefix: str) -> Iterator[Path]:
    """A private temporary directory on near's filesystem, removed afterwards."""
    near.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=near))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
