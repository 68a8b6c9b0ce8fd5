"""Paths of an unpacked image, opened on the host as the image itself would see them.

An image is untrusted: its /etc/passwd may be a symlink to the host's /etc/shadow, its /data a symlink to `/`
(so that `VOLUME /data/etc` would copy the host's /etc into a volume the app can read). Every path here is
resolved by the kernel inside the image root (openat2 with RESOLVE_IN_ROOT: `..` and absolute symlinks stop at
the root, as in a chroot), and only regular files of bounded size are read: a FIFO or a device in the image
could otherwise block or flood the daemon.
"""

from __future__ import annotations

import ctypes
import errno
import os
import stat
from pathlib import Path

from activator.errors import ImageError

SYS_OPENAT2 = 437  # the same number on every architecture (added after the syscall tables were unified)
RESOLVE_NO_MAGICLINKS = 0x02
RESOLVE_IN_ROOT = 0x10
#: the most read of one image file (/etc/passwd, /etc/group): more is not a real account database
MAX_FILE = 4 << 20

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


def open_in(root: Path, path: str, flags: int) -> int:
    """An fd on `path` as seen from inside `root` (absolute or relative, symlinks followed within root)."""
    rfd = os.open(root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        how = _OpenHow(flags | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(SYS_OPENAT2, rfd, os.fsencode(path.lstrip("/") or "."), ctypes.byref(how),
                           ctypes.sizeof(how))
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), path)
        return int(fd)
    finally:
        os.close(rfd)


def read_text(root: Path, path: str) -> str | None:
    """The image's regular file at `path`, or None when it is missing or not a regular file."""
    try:
        fd = open_in(root, path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV, errno.EACCES):
            return None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, MAX_FILE)
    finally:
        os.close(fd)
    return data.decode(errors="replace")


def open_dir(root: Path, path: str) -> int | None:
    """An O_PATH fd on the image's directory at `path` (for copying it from /proc/self/fd/N), or None."""
    try:
        return open_in(root, path, os.O_PATH | os.O_DIRECTORY)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV):
            return None
        raise


def replace_file(root: Path, directory: str, name: str, text: str, *, owner: int | None = None) -> bool:
    """Blocking. Put a new regular file `name` (0644, owned by `owner` when given) in the image's `directory`,
    resolved inside `root` like every path here: an /etc that is a symlink to the host's /etc leads to the
    image's own directory of that name, and whatever stood at `name` (a symlink anywhere) is removed, never
    followed. False when the image has no such directory; ImageError (one line) when `name` is a directory."""
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise ValueError(f"{name!r} is not one file name")
    try:
        dfd = open_in(root, directory, os.O_RDONLY | os.O_DIRECTORY)
    except OSError as e:
        if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP, errno.EXDEV, errno.EACCES):
            return False
        raise
    try:
        try:
            os.unlink(name, dir_fd=dfd)
        except FileNotFoundError:
            pass
        except IsADirectoryError:
            raise ImageError(f"the image's {directory.rstrip('/')}/{name} is a directory; activator writes a file "
                             "there") from None
        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644, dir_fd=dfd)
        try:
            os.fchmod(fd, 0o644)  # whatever the umask
            if owner is not None:
                os.fchown(fd, owner, owner)
            data = text.encode()
            while data:
                data = data[os.write(fd, data):]
        finally:
            os.close(fd)
    finally:
        os.close(dfd)
    return True
