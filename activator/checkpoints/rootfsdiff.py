"""The root filesystem diff, a tar inside a checkpoint's layer (as Podman's rootfs-diff.tar): packed with numeric
owners and the overlay's xattrs, and unpacked only once every member is checked. Blocking."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

from .ociarchive import ArchiveError, run_tool


def pack_tree(src: Path, out: Path) -> None:
    """Tar a directory with numeric owners and the overlay's xattrs (an opaque directory, a whiteout device)."""
    run_tool(["tar", "--create", "--file", str(out), "--numeric-owner", "--xattrs",
              "--xattrs-include=trusted.overlay.*", "--acls", "-C", str(src), "."], "packing the filesystem diff")


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
    run_tool(["tar", "--extract", "--file", str(archive), "--numeric-owner", "--same-permissions", "--xattrs",
              "--xattrs-include=trusted.overlay.*", "--acls", "-C", str(dest)],
             "unpacking the filesystem diff")
