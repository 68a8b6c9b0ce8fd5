"""OCI image archives of one layer: written, read back with every digest checked, and unpacked safely.

An archive is an OCI image layout (oci-layout, index.json, blobs/sha256/...) in one tar: what skopeo's
`oci-archive:` transport reads and writes, so a registry is reached by `skopeo copy` without any format of ours.
A checkpoint image is one such image whose single layer holds the checkpoint files and whose manifest carries
the `org.criu.checkpoint.*` annotations Podman, CRI-O and checkpointctl use (transfer.py fills them in).

Nothing here trusts the archive: index, manifest, config and layer are each checked against the digest that
names them before they are used; the layer is decompressed with its output bounded as it streams, and unpacked
by our own code, which takes regular files and directories only (a checkpoint layer holds nothing else) after
checking every member's name, before anything is written: tarfile's `data` filter has had bypasses in 3.11
point releases (CVE-2024-12718, CVE-2025-4138, -4330, -4517), so nothing here depends on it.

Nor does writing trust the place written to: an archive is written only below directories root owns and no
other user can write (a sticky one such as /tmp may be passed or written in), reached without following a link
another user could have planted, into a new file of a random name (O_EXCL|O_NOFOLLOW) renamed into place.
Blocking: callers run these in a thread. The layer is unpacked by ocilayer.py, the filesystem diff inside it by
rootfsdiff.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import secrets
import shutil
import stat
import subprocess
import tarfile
import tempfile
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
#: members of an archive or a layer: a checkpoint holds a few per process and thread (CRIU's images)
MAX_MEMBERS = 65536
#: symbolic links followed on the way to an output directory (as the kernel's own limit)
MAX_LINKS = 40


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


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            h.update(chunk)
    return "sha256:" + h.hexdigest()


def write(out: Path, layer_tar: Path, annotations: dict[str, str], *, ref: str, arch: str,
          created: str, labels: dict[str, str] | None = None,
          seal: Callable[[str], dict[str, str]] | None = None) -> Image:
    """Write an archive of one image whose one layer is layer_tar (uncompressed; compressed here with zstd),
    atomically (_publish). seal: given the manifest digest, annotations for the index's descriptor of it (a
    signature: outside what the digest covers). The blobs are staged beside layer_tar (the caller's private
    scratch): nothing but the archive itself is made in out's directory."""
    with tempfile.TemporaryDirectory(prefix=".oci-", dir=layer_tar.parent) as tmp:
        _stage(Path(tmp), layer_tar, annotations, ref=ref, arch=arch, created=created, labels=labels, seal=seal)

        def fill(f: IO[bytes]) -> None:
            with tarfile.open(fileobj=f, mode="w", format=tarfile.PAX_FORMAT) as t:
                for member in ("oci-layout", "index.json", "blobs"):
                    t.add(Path(tmp, member), arcname=member, filter=root_owned)

        _publish(out, fill)
    return read(out)


def _stage(tmp: Path, layer_tar: Path, annotations: dict[str, str], *, ref: str, arch: str, created: str,
           labels: dict[str, str] | None, seal: Callable[[str], dict[str, str]] | None) -> None:
    """The image layout (oci-layout, index.json, blobs/) in tmp."""
    blobs = tmp / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    diff_id = sha256_file(layer_tar)
    packed = tmp / "layer.zst"
    run_tool(["zstd", "-q", "-T0", "-3", "-o", str(packed), str(layer_tar)], "compressing the layer")
    layer = Blob(LAYER_ZSTD, sha256_file(packed), packed.stat().st_size)
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
    (tmp / "oci-layout").write_text('{"imageLayoutVersion":"1.0.0"}')
    (tmp / "index.json").write_text(json.dumps({
        "schemaVersion": 2, "mediaType": INDEX,
        "manifests": [manifest.descriptor() | {"annotations": {REF_NAME: ref} | (seal(manifest.digest)
                                                                                if seal else {})}]}))


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

        def fill(raw: IO[bytes]) -> None:
            with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as out:
                for m in t.getmembers():
                    if m.name.removeprefix("./") == "index.json":
                        info = tarfile.TarInfo("index.json")
                        info.size, info.mode, info.mtime = len(data), 0o644, m.mtime
                        out.addfile(info, io.BytesIO(data))
                    elif m.isfile():
                        out.addfile(m, t.extractfile(m))
                    else:
                        out.addfile(m)

        _publish(path, fill)
    return read(path)


def _publish(out: Path, fill: Callable[[IO[bytes]], None]) -> None:
    """Make `out` with what fill writes: a new private file of a random name (O_EXCL|O_NOFOLLOW: never a file or
    link someone else put there; 0600: an app's memory is in it) in out's directory, which must be safe to write
    in (safe_dir), then renamed into place (which replaces an entry of that name, a link included, without
    following it)."""
    name = out.name
    if name in ("", ".", "..") or "/" in name:
        raise ArchiveError(f"{out}: not a file name")
    dirfd = safe_dir(out.parent)
    partial = f".{name}.{secrets.token_hex(8)}.partial"
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                     dir_fd=dirfd)
        try:
            with os.fdopen(fd, "wb") as f:
                fill(f)
                f.flush()
                os.fsync(f.fileno())
            os.rename(partial, name, src_dir_fd=dirfd, dst_dir_fd=dirfd)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(partial, dir_fd=dirfd)
            raise
    except OSError as e:
        raise ArchiveError(f"{out}: cannot be written ({e.strerror or e})") from None
    finally:
        os.close(dirfd)


def safe_dir(path: Path) -> int:
    """An O_PATH fd on directory `path`, reached from / one name at a time without following anything another
    user could have made or can change: every directory on the way (links resolved, each link root's own) is
    owned by root and writable by no other user, unless it is sticky (as /tmp): there others cannot rename or
    remove what root owns, and every name taken in it is root's (checked as it is taken). Otherwise one line
    naming the directory and why.

    A sticky directory is accepted as the place written to as well: root's new file there is created with
    O_EXCL|O_NOFOLLOW under a random name, so no planted name is ever opened, and the rename that puts it in
    place replaces whatever entry had the final name (a link included) without following it."""
    todo = list(Path(os.path.abspath(path)).parts[1:])
    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    here = Path("/")
    links = 0
    try:
        _check_dir(os.fstat(fd), here, path)
        while todo:
            part = todo.pop(0)
            if part in ("", "."):
                continue
            if part == "..":  # a link's target may have them (abspath removed those of `path`)
                nfd = os.open("..", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=fd)
                os.close(fd)
                fd, here = nfd, here.parent
                _check_dir(os.fstat(fd), here, path)
                continue
            try:
                st = os.stat(part, dir_fd=fd, follow_symlinks=False)
            except FileNotFoundError:
                raise ArchiveError(f"{path}: no such directory ({here / part} does not exist)") from None
            if stat.S_ISLNK(st.st_mode):
                links += 1
                if st.st_uid not in (0, os.geteuid()):
                    raise ArchiveError(f"{path}: {here / part} is a symbolic link owned by uid {st.st_uid}, not "
                                       "root: whoever owns it chooses where root's archive goes; give a path "
                                       "without it")
                if links > MAX_LINKS:
                    raise ArchiveError(f"{path}: too many symbolic links")
                target = os.readlink(part, dir_fd=fd)
                todo = [*Path(target).parts, *todo]
                if target.startswith("/"):
                    todo = todo[1:]
                    here = Path("/")
                    os.close(fd)
                    fd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                continue
            if not stat.S_ISDIR(st.st_mode):
                raise ArchiveError(f"{path}: {here / part} is not a directory")
            nfd = os.open(part, os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            os.close(fd)
            fd = nfd
            here = here / part
            _check_dir(os.fstat(fd), here, path)  # what was opened, not what was looked at before
        return fd
    except BaseException:
        os.close(fd)
        raise


def _check_dir(st: os.stat_result, where: Path, path: Path) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise ArchiveError(f"{_at(path, where)} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise ArchiveError(f"{_at(path, where)} is owned by uid {st.st_uid}, not root: its owner could put a link "
                           "where root's archive is written; write it in a directory only root can write "
                           "(e.g. /root or /var/lib/activator)")
    others = st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid != 0)
    if others and not st.st_mode & stat.S_ISVTX:
        raise ArchiveError(f"{_at(path, where)} is writable by other users (mode {stat.S_IMODE(st.st_mode):o}) and "
                           "not sticky: they could swap what root writes there; write it in a directory only "
                           "root can write (e.g. /root or /var/lib/activator)")


def _at(path: Path, where: Path) -> str:
    return str(where) if Path(os.path.abspath(path)) == where else f"{path}: {where}"


def root_owned(info: tarfile.TarInfo) -> tarfile.TarInfo:
    """A tarfile filter: members owned by root, without names (the exporting host's ids mean nothing elsewhere)."""
    info.uid = info.gid = 0
    info.uname = info.gname = ""
    return info


def read(path: Path) -> Image:
    """The archive's (first) image, with its index, manifest and config checked against their digests."""
    try:
        with tarfile.open(path, "r:") as t:
            members: dict[str, tarfile.TarInfo] = {}
            for i, m in enumerate(t):  # headers only: the blobs are read, when asked for, by their digests
                if i >= MAX_MEMBERS:
                    raise ArchiveError(f"{path}: more than {MAX_MEMBERS} members; not an image of this kind")
                if m.isfile():
                    members[m.name.removeprefix("./")] = m

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
    except (OSError, tarfile.TarError, ValueError, KeyError, TypeError, AttributeError, RecursionError,
            OverflowError) as e:  # a crafted document nests deeper than the parser goes, or sizes past floats
        if isinstance(e, ArchiveError):
            raise
        raise ArchiveError(f"{path}: not a readable OCI image archive ({type(e).__name__}: {e})") from None


def run_tool(argv: list[str], what: str) -> None:
    try:
        p = subprocess.run(argv, capture_output=True, timeout=900)
    except FileNotFoundError:
        raise ArchiveError(f"{what} needs `{argv[0]}`, which is not installed; run 'make setup' (or apt-get "
                           f"install {argv[0]})") from None
    if p.returncode:
        raise ArchiveError(f"{what} failed: {p.stderr.decode(errors='replace').strip()[:300]}")


@contextlib.contextmanager
def scratch(near: Path, prefix: str) -> Iterator[Path]:
    """A private temporary directory on near's filesystem, removed afterwards."""
    near.mkdir(parents=True, exist_ok=True)
    d = Path(tempfile.mkdtemp(prefix=prefix, dir=near))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)
