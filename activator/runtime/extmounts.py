"""The container's own tmpfs mounts, made ahead by activator instead of rebuilt by CRIU at every restore.

CRIU restores a tmpfs by running `tar --extract --gzip` on the contents it dumped: two execs, ~3 ms each, for
/dev, /dev/shm and every directory runc masks with a read-only tmpfs (Docker's maskedPaths: /proc/acpi,
/sys/firmware, ...). Those were a third of CRIU's work in a small app's restore. So the template is dumped with
them marked external (CRIU records only where they were mounted), and every prepared slot gets them ready:

    /dev        a tmpfs rebuilt from a snapshot of the template's /dev taken just before the dump (device nodes,
                symlinks and the mount-point directories runc made; what an app may have added is lost, as
                with any restart of a container)
    /dev/shm    a fresh tmpfs (mode 1777, 64 MiB, nosuid,nodev,noexec), private to the instance
    masks       one empty directory, bound read-only on each masked directory (empty and read-only, as the
                tmpfs runc uses)

CRIU bind-mounts them into the restored mount namespace with the flags the dump recorded. The slot's own copies
live under its directory in state_dir (0700) and are unmounted with it.
"""

from __future__ import annotations

import ctypes
import os
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .spec import MASKED_PATHS

_libc = ctypes.CDLL(None, use_errno=True)
MS_NOSUID, MS_NODEV, MS_NOEXEC, MS_STRICTATIME = 2, 4, 8, 1 << 24


def masked_dirs() -> list[str]:
    """The masked paths runc covers with a tmpfs (directories; files get /dev/null bound instead)."""
    return [p for p in MASKED_PATHS if os.path.isdir(p) and not os.path.islink(p)]


def mounts() -> dict[str, str]:
    """key -> mountpoint inside the container, for the dump's `external mnt[MOUNTPOINT]:KEY`."""
    out = {"dev": "/dev", "shm": "/dev/shm"}
    out.update({f"mask{i}": p for i, p in enumerate(masked_dirs())})
    return out


@dataclass(frozen=True)
class DevEntry:
    name: str
    kind: str  # "chr", "blk", "dir", "link"
    mode: int
    rdev: int = 0
    target: str = ""


def snapshot_dev(pid: int) -> list[DevEntry]:
    """The top level of a running container's /dev, read from the host through /proc/PID/root."""
    root = Path(f"/proc/{pid}/root/dev")
    out = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            out.append(DevEntry(entry.name, "link", 0o777, target=os.readlink(entry.path)))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            out.append(DevEntry(entry.name, "chr" if stat.S_ISCHR(st.st_mode) else "blk",
                                stat.S_IMODE(st.st_mode), st.st_rdev))
        elif stat.S_ISDIR(st.st_mode):
            out.append(DevEntry(entry.name, "dir", stat.S_IMODE(st.st_mode)))
    return out


def dev_from_json(items: list[dict[str, Any]]) -> tuple[DevEntry, ...]:
    return tuple(DevEntry(**i) for i in items)


def _mount_tmpfs(target: Path, flags: int, options: str) -> None:
    target.mkdir(mode=0o700, exist_ok=True)
    if _libc.mount(b"tmpfs", str(target).encode(), b"tmpfs", flags, options.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mounting a tmpfs on {target} failed: {os.strerror(e)}")


def prepare(where: Path, dev: tuple[DevEntry, ...], keys: dict[str, str], owner: int | None = None
            ) -> dict[str, Path]:
    """Blocking. Make the external mounts for one instance under `where`; returns key -> host path. owner: the
    host id of the instance's root in its user namespace, which owns /dev and /dev/shm as runc would make them
    there, and whose restore mounts them from here."""
    where.mkdir(mode=0o700, exist_ok=True)
    ids = ""
    if owner is not None:
        os.chown(where, 0, owner)
        os.chmod(where, 0o710)
        ids = f",uid={owner},gid={owner}"
    d = where / "dev"
    _mount_tmpfs(d, MS_NOSUID | MS_STRICTATIME, "mode=755,size=65536k" + ids)
    for e in dev:
        p = d / e.name
        if e.kind == "link":
            os.symlink(e.target, p)
        elif e.kind == "dir":
            p.mkdir(mode=e.mode)
            os.chmod(p, e.mode)
        else:
            os.mknod(p, e.mode | (stat.S_IFCHR if e.kind == "chr" else stat.S_IFBLK), e.rdev)
            os.chmod(p, e.mode)
    _mount_tmpfs(where / "shm", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k" + ids)
    empty = where / "empty"
    empty.mkdir(mode=0o555, exist_ok=True)
    paths = {"dev": d, "shm": where / "shm"}
    paths.update({k: empty for k in keys if k.startswith("mask")})
    return paths
