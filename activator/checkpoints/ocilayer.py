"""An image's one layer unpacked (ociarchive.py reads the image): its compressed bytes checked against their digest,
decompressed with the output bounded as it streams, its diff_id checked, and unpacked by our own code, which
takes regular files and directories only after checking every member's name, before anything is written
(tarfile's `data` filter has had bypasses in 3.11 point releases: nothing here depends on it). Blocking."""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
import threading
import zlib
from pathlib import Path
from typing import IO, Any

from . import ociarchive
from .ociarchive import CHUNK, ArchiveError, Image, sha256_file


def unpack_layer(image: Image, dest: Path, *, max_bytes: int) -> None:
    """Unpack the image's one layer into dest (an empty directory), its digest and diff_id checked on the way,
    at most max_bytes of it (counted as it is decompressed), every member checked before any is written."""
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
        if diff_ids and sha256_file(plain) != diff_ids[0]:
            raise ArchiveError(f"{image.path}: the unpacked layer does not match the config's diff_id")
        try:
            with tarfile.open(plain, "r:") as t:
                members = checked_members(t, f"{image.path}: layer")
                _extract(t, members, dest)
        except tarfile.TarError as e:
            raise ArchiveError(f"{image.path}: the layer is not a readable tar ({e})") from None


def checked_members(t: tarfile.TarFile, where: str) -> list[tuple[str, tarfile.TarInfo]]:
    """Every member of a checkpoint layer, with its normalised name, or one line naming the first that is not a
    plain file or directory with a plain name inside the tree, appears twice, or is one too many."""
    out: list[tuple[str, tarfile.TarInfo]] = []
    seen: set[str] = set()
    for m in t:
        if len(out) >= ociarchive.MAX_MEMBERS:  # one bound for an archive and its layer
            raise ArchiveError(f"{where}: more than {ociarchive.MAX_MEMBERS} members")
        raw = m.name
        shown = repr(raw[:100])
        if any(ord(c) < 0x20 or c == "\x7f" for c in raw):
            raise ArchiveError(f"{where}: member {shown}: a control character in its name")
        parts = [p for p in raw.removeprefix("./").rstrip("/").split("/")]
        if raw.startswith("/") or not raw or any(p in ("", ".", "..") for p in parts):
            raise ArchiveError(f"{where}: member {shown}: not a plain name inside the tree (absolute, empty, "
                               "`.` or `..`)")
        if m.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE) or m.sparse is not None:
            kind = {tarfile.SYMTYPE: "a symbolic link", tarfile.LNKTYPE: "a hard link", tarfile.CHRTYPE: "a device",
                    tarfile.BLKTYPE: "a device", tarfile.FIFOTYPE: "a fifo"}.get(m.type, f"of type {m.type!r}")
            raise ArchiveError(f"{where}: member {shown} is {'sparse' if m.sparse is not None else kind}; a "
                               "checkpoint layer holds regular files and directories only")
        name = "/".join(parts)
        if name in seen:
            raise ArchiveError(f"{where}: member {shown} appears twice")
        seen.add(name)
        out.append((name, m))
    return out


def _extract(t: tarfile.TarFile, members: list[tuple[str, tarfile.TarInfo]], dest: Path) -> None:
    """Write checked members below dest (empty: nothing in it is a link), owned by us, no set-id or shared-write
    bits. A file is created with O_EXCL|O_NOFOLLOW, so nothing is written over or through another entry."""
    for name, m in members:
        path = dest / name
        try:
            if m.isdir():
                path.mkdir(mode=0o700, parents=True, exist_ok=True)
                if path.is_symlink() or not path.is_dir():
                    raise ArchiveError(f"{dest}: {name!r} is not a directory")
                os.chmod(path, (m.mode & 0o755) | 0o700)
                continue
            path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            src = t.extractfile(m)
            assert src is not None
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                         (m.mode & 0o755) | 0o600)
            with os.fdopen(fd, "wb") as f:
                shutil.copyfileobj(src, f, CHUNK)
        except OSError as e:
            raise ArchiveError(f"{dest}: member {name[:100]!r} cannot be unpacked ({e.strerror})") from None


def _decompress(src: IO[bytes], media_type: str, out: Path, max_bytes: int, where: Path, digest: str) -> None:
    """Copy the compressed blob through its decompressor into out, at most max_bytes of output (counted as it
    streams: a small blob that inflates without end is stopped there), checking the compressed bytes' digest
    first (an altered blob is refused as altered, whatever its decompressor said)."""
    h = hashlib.sha256()
    too_big = f"{where}: the layer unpacks to more than {max_bytes} bytes"
    if media_type.endswith("zstd"):
        proc = subprocess.Popen(["zstd", "-q", "-d", "-c"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        stdin, errors = proc.stdin, proc.stderr
        err: list[bytes] = []

        def feed() -> None:  # the whole blob is hashed, even once zstd has stopped taking it
            broken = False
            while chunk := src.read(CHUNK):
                h.update(chunk)
                if not broken:
                    try:
                        stdin.write(chunk)
                    except (BrokenPipeError, ValueError):
                        broken = True
            with contextlib.suppress(BrokenPipeError, ValueError):
                stdin.close()

        feeder = threading.Thread(target=feed, name="layer-feed", daemon=True)
        drainer = threading.Thread(target=lambda: err.append(errors.read(65536)), name="layer-err", daemon=True)
        feeder.start()
        drainer.start()
        copied, over = 0, False
        try:
            with open(out, "wb") as dst:
                while chunk := proc.stdout.read(CHUNK):
                    copied += len(chunk)
                    if copied > max_bytes:
                        over = True
                        proc.kill()
                        break
                    dst.write(chunk)
        finally:
            proc.stdout.close()
            feeder.join()
            proc.wait(timeout=600)
            drainer.join()
            errors.close()
        _check_digest(h, digest, where)
        if over:
            raise ArchiveError(too_big)
        if proc.returncode:
            said = b"".join(err).decode(errors="replace").strip()
            raise ArchiveError(f"{where}: the layer does not decompress: {said}")
    elif media_type.endswith(("gzip", "tar")):
        with open(out, "wb") as dst:  # hashed as read, then inflated
            hashed = _Hashing(src, h)
            stream: Any = gzip.GzipFile(fileobj=hashed) if media_type.endswith("gzip") else hashed
            copied, broken, over = 0, "", False
            try:
                while chunk := stream.read(CHUNK):
                    copied += len(chunk)
                    if copied > max_bytes:
                        over = True
                        break
                    dst.write(chunk)
            except (OSError, EOFError, zlib.error) as e:
                broken = str(e)
            while hashed.read(CHUNK):  # a gzip trailer or padding is part of the digest too
                pass
        _check_digest(h, digest, where)
        if over:
            raise ArchiveError(too_big)
        if broken:
            raise ArchiveError(f"{where}: the layer does not decompress: {broken}")
    else:
        raise ArchiveError(f"{where}: layer media type '{media_type}' is not one activator reads")


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
