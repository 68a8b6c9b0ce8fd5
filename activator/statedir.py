"""The state directory: its whole layout, its lock, and who may read it.

    state_dir/                  0711: holds app data, environment and memory images; root only (others may pass
                                through to a path they know, and find only 0700 directories and 0600 files)
      lock                      flock()ed by the one activator using this state_dir
      control.sock              `activator status` talks to the daemon here (0600, SO_PEERCRED-checked too)
      checkpoints/SERVICE/      one checkpoint per service (checkpoint.py); .build-* while one is made,
                                .retired-* while a replaced one is still mounted by running instances
      images/ID/rootfs          unpacked image root filesystems, shared read-only (images.py); .unpack-* meanwhile
      instances/NAME/           one directory per instance or template (sandbox.py); instances/ is 0711 and,
                                in a user namespace, NAME is 0710 for the service's range (userns.py)
      userns.json               each service's user namespace range
      logs/                     what failed: app output, CRIU and runc logs (0600)
      runc/                     runc's own root for our containers, and the CRIU config runc hands to CRIU

Every directory is created 0700 and every file that can hold environment, app output or memory 0600, so the
contents stay private even if an operator loosens state_dir itself. Container root filesystems inside keep their
image's own modes: the 0700 parents are what keep other users out.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import shutil
from pathlib import Path

from activator.config.model import Config
from activator.errors import ActivatorError

DIR_MODE = 0o700
TRAVERSE_MODE = 0o711
FILE_MODE = 0o600


LOCK = "lock"


def in_use(root: Path) -> bool:
    """Is an activator running on the state dir at root (holding its lock)?"""
    try:
        fd = os.open(root / LOCK, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        return False
    except BlockingIOError:
        return True
    finally:
        os.close(fd)


def private_dir(path: Path) -> Path:
    """mkdir -p with 0700 for the last component (an existing one is tightened to 0700)."""
    path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
    os.chmod(path, DIR_MODE)
    return path


def write_private(path: Path, data: str | bytes) -> None:
    """Write a file readable by root only, whatever the umask."""
    raw = data.encode() if isinstance(data, str) else data
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, FILE_MODE)
    try:
        os.fchmod(fd, FILE_MODE)
        os.write(fd, raw)
    finally:
        os.close(fd)


def open_private(path: Path, flags: int = os.O_WRONLY | os.O_CREAT | os.O_APPEND) -> int:
    fd = os.open(path, flags | os.O_CLOEXEC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    return fd


def copy_private(src: Path, dest: Path) -> None:
    with open(src, "rb") as s, os.fdopen(open_private(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), "wb") as d:
        shutil.copyfileobj(s, d)


class StateDir:
    """state_dir's layout and the lock that keeps two activators off it."""

    def __init__(self, root: Path, *, runc: str = "runc", criu: str = "criu", config_path: Path | None = None
                 ) -> None:
        self.config_path = config_path
        self.root = root
        self.runc_binary = runc
        self.criu_binary = criu
        self.control_socket = root / "control.sock"
        self.checkpoints = self.root / "checkpoints"
        self.images = self.root / "images"
        self.instances = self.root / "instances"
        self.logs = self.root / "logs"
        self.runc_root = self.root / "runc"
        self._lock_fd: int | None = None

    @classmethod
    def of(cls, config: Config) -> StateDir:
        return cls(config.settings.state_dir, runc=config.settings.runc, criu=config.settings.criu,
                   config_path=config.path)

    def lock(self) -> None:
        """Create the layout (private), take the lock. One line naming settings.state_dir on any failure."""
        try:
            for d in (self.root, self.checkpoints, self.images, self.instances, self.logs, self.runc_root):
                private_dir(d)
            for d in (self.root, self.instances):
                # Passable, not listable: an instance in a user namespace reaches its own directory (0710, its
                # range's group) by path; everything else below stays 0700/0600.
                os.chmod(d, TRAVERSE_MODE)
            fd = os.open(self.root / LOCK, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, FILE_MODE)
        except OSError as e:
            where = f"{self.config_path}: settings.state_dir" if self.config_path else "state_dir"
            raise ActivatorError(f"{where}: {self._why(e)}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ActivatorError(
                f"another activator is already using state_dir {self.root}; stop it or set settings.state_dir"
            ) from None
        self._lock_fd = fd

    def _why(self, e: OSError) -> str:
        where = e.filename or self.root
        if e.errno in (errno.ENOTDIR, errno.EEXIST):
            return f"{where} is not a directory; remove what is in the way or pick another path"
        if e.errno == errno.EROFS:
            return f"{where} is on a read-only file system; pick a writable path"
        if e.errno == errno.ENOSPC:
            return f"no space left on the device of {where}; free some space"
        if e.errno in (errno.EACCES, errno.EPERM):
            return f"{where}: permission denied; activator runs as root and needs a directory it can write"
        return f"{where}: {e.strerror}"

    def unlock(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)
            self._lock_fd = None

    def leftover_builds(self) -> list[Path]:
        """Half-made checkpoints and half-unpacked images a killed run left (only ever made under the lock)."""
        found: list[Path] = []
        with contextlib.suppress(OSError):
            found += sorted(self.checkpoints.glob(".build-*"))
        with contextlib.suppress(OSError):
            found += sorted(self.images.glob("*/.unpack-*"))
        return found
