"""Overlay root filesystems.

lower = checkpoint diff (the template's own changes) : unpacked image, upper = fresh per instance. Nothing is
copied, so N instances of one checkpoint cost N empty upper directories. The template itself runs on
lower = image only; its upper directory becomes the checkpoint's diff layer.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
from pathlib import Path

_libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
MNT_DETACH = 2
MS_BIND, MS_REC = 4096, 16384


def mount_overlay(lower: list[Path], upper: Path, work: Path, target: Path) -> None:
    for d in (upper, work, target):
        d.mkdir(parents=True, exist_ok=True)
    opts = f"lowerdir={':'.join(str(p) for p in lower)},upperdir={upper},workdir={work}"
    if _libc.mount(b"overlay", str(target).encode(), b"overlay", 0, opts.encode()) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"mounting overlay on {target} failed: {os.strerror(e)}")


def bind(source: Path, target: Path) -> None:
    """Bind-mount source (recursively) on target, made (a directory) if missing."""
    if not target.exists():
        target.mkdir(mode=0o700, parents=True)
    if _libc.mount(str(source).encode(), str(target).encode(), None, MS_BIND | MS_REC, None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, f"bind-mounting {source} on {target} failed: {os.strerror(e)}")


def unmount(target: Path) -> None:
    """Detach the mount at target; a path that is not mounted is fine."""
    if _libc.umount2(str(target).encode(), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):
            raise OSError(e, f"unmounting {target} failed: {os.strerror(e)}")


def mounts_under(prefix: Path) -> list[Path]:
    """Mount points below prefix, deepest first (the order they must be unmounted in)."""
    found = []
    root = str(prefix).rstrip("/") + "/"
    with open("/proc/self/mountinfo") as f:
        for line in f:
            point = line.split()[4].replace("\\040", " ")
            if point.startswith(root):
                found.append(Path(point))
    return sorted(found, key=lambda p: len(p.parts), reverse=True)
