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

A state_dir whose parents other users cannot pass (`mktemp -d`, anything under /root) is used through a private
bind of itself, ALIASES/ID (ID: a hash of its real path), made by lock() and removed by unlock(): an instance's
root (an unprivileged uid on the host) reaches its root filesystem and volumes by path through /run instead. The
bind is the same directory (same modes: still 0711 at the top, 0700 below), so nothing becomes readable; the
lock and control socket stay at the real path, where `activator status` looks.

Every directory is created 0700 and every file that can hold environment, app output or memory 0600, so the
contents stay private even if an operator loosens state_dir itself. Container root filesystems inside keep their
image's own modes: the 0700 parents are what keep other users out.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import re
import shutil
import stat
from pathlib import Path

from activator.config.document import Config
from activator.errors import ActivatorError

DIR_MODE = 0o700
TRAVERSE_MODE = 0o711
FILE_MODE = 0o600


LOCK = "lock"
#: where a state_dir others cannot reach is bound for its instances (see the module docstring)
ALIASES = Path("/run/activator/state")
#: alias -> the state_dir it is a bind of, for what must name the real one (userns.Ranges' host-wide registry)
_aliases: dict[Path, Path] = {}
_libc = ctypes.CDLL(None, use_errno=True)
MS_BIND, MS_REC, MS_PRIVATE, MNT_DETACH = 4096, 16384, 1 << 18, 2


def real(path: Path) -> Path:
    """The state_dir path (or a path in it) as configured, for one that may be under its alias."""
    for alias, root in _aliases.items():
        if path == alias or alias in path.parents:
            return root / path.relative_to(alias)
    return path


#: below this, `run` cannot write its small state files (the CRIU config, userns.json, a lock): `validate` says so
SPACE_NEEDED = 1 << 20


def free_space(path: Path) -> tuple[int, int] | None:
    """(bytes, inodes) root may still use (statvfs f_bfree, f_ffree) on the device of path or its nearest existing
    parent; None if none can be asked."""
    for d in (path, *path.parents):
        try:
            st = os.statvfs(d)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        return st.f_bfree * st.f_frsize, st.f_ffree if st.f_files else 1 << 30  # some file systems count no inodes
    return None


def out_of_space(state_dir: Path, e: BaseException) -> str | None:
    """The one line for a full disk met anywhere (ENOSPC, EDQUOT), naming state_dir when its device is the full
    one, and the fix; None for any other error."""
    if not isinstance(e, OSError) or e.errno not in (errno.ENOSPC, errno.EDQUOT):
        return None
    what = "disk quota exceeded" if e.errno == errno.EDQUOT else "no space left"
    free = free_space(state_dir)
    if free is None or free[0] < SPACE_NEEDED or free[1] == 0 or e.errno == errno.EDQUOT:
        shown = "" if free is None else f" ({free[0] // 2**20} MiB, {free[1]} inodes free)"
        return f"{what} on the device of state_dir {state_dir}{shown}; free some space there (or move " \
               "settings.state_dir) and run again: nothing was replaced or left running"
    return f"{what} on a device other than state_dir's ({e.filename or 'a file activator wrote'}; state_dir " \
           f"{state_dir} has {free[0] // 2**20} MiB free); free some space on it and run again"


def check_space(state_dir: Path) -> str | None:
    """What `validate` says of a state_dir too full for `run` to start, or None."""
    free = free_space(state_dir)
    if free is not None and (free[0] < SPACE_NEEDED or free[1] == 0):
        return f"no space left on the device of state_dir {state_dir} ({free[0] // 2**10} KiB, {free[1]} inodes " \
               "free): `run` cannot start; free some space there or move settings.state_dir"
    return None


def impassable(path: Path) -> Path | None:
    """The first directory above path that lets no other user pass (o+x), or None."""
    for d in path.resolve().parents:
        try:
            if not os.stat(d).st_mode & stat.S_IXOTH:
                return d
        except OSError:
            continue
    return None


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
        self.alias: Path | None = None  # the bind instances reach state_dir through, while locked (lock())
        self._lock_fd: int | None = None

    def _work_in(self, base: Path) -> None:
        self.checkpoints = base / "checkpoints"
        self.images = base / "images"
        self.instances = base / "instances"
        self.logs = base / "logs"
        self.runc_root = base / "runc"

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
        if impassable(self.root) is not None:
            try:
                self._bind_alias()
            except OSError as e:
                self.unlock()
                where = f"{self.config_path}: settings.state_dir" if self.config_path else "state_dir"
                raise ActivatorError(
                    f"{where}: {impassable(self.root)} lets no other user pass and binding {self.root} under "
                    f"{ALIASES} failed ({e.strerror}); `chmod o+x` it (passing lists nothing), move "
                    "settings.state_dir, or set 'userns: host'") from None
        else:
            self._drop_stale_alias()

    def _alias_of(self) -> tuple[Path, Path]:
        real_root = self.root.resolve()
        return ALIASES / hashlib.sha256(str(real_root).encode()).hexdigest()[:16], real_root

    def _drop_stale_alias(self) -> None:
        """A killed run's bind of this state_dir, left because its parents have since been made passable (what the
        refusal above advises): nothing would unmount it, and the instance mounts inside it would stay. Under the
        lock, so no running activator is using it."""
        alias, real_root = self._alias_of()
        with contextlib.suppress(OSError):
            if _mounted(alias) and os.path.samefile(alias, real_root):
                _umount(alias)
                alias.rmdir()

    def _bind_alias(self) -> None:
        """Bind state_dir (privately: the instances' mounts stay in the bind) at ALIASES/ID and work through it.
        One a killed run left is reused if it is this state_dir's, replaced if not."""
        alias, real_root = self._alias_of()
        for d in (ALIASES.parent, ALIASES):
            d.mkdir(mode=TRAVERSE_MODE, exist_ok=True)
            os.chmod(d, TRAVERSE_MODE)
        alias.mkdir(mode=DIR_MODE, exist_ok=True)
        same = _mounted(alias) and (os.stat(alias).st_dev, os.stat(alias).st_ino) == \
            (os.stat(real_root).st_dev, os.stat(real_root).st_ino)
        if not same:
            if _mounted(alias):
                _umount(alias)
            _mount(real_root, alias, MS_BIND | MS_REC)
            _mount(None, alias, MS_PRIVATE | MS_REC)
        self.alias = alias
        _aliases[alias] = self.root
        self._work_in(alias)

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
        if self.alias is not None:  # before the lock goes: no other activator may be binding it meanwhile
            alias, self.alias = self.alias, None
            _aliases.pop(alias, None)
            self._work_in(self.root)
            with contextlib.suppress(OSError):
                _umount(alias)
                alias.rmdir()
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


def _mounted(path: Path) -> bool:
    """Whether something is mounted at path. Not os.path.ismount: a bind of a directory on the file system that
    also holds /run (a host whose /run is no tmpfs) has its parent's device and looks like a plain directory."""
    target = os.fsencode(path)
    with open("/proc/self/mountinfo", "rb") as f:
        for line in f:
            point = line.split()[4]
            if b"\\" in point:  # spaces, tabs, newlines and backslashes are written as octal escapes
                point = re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8)]), point)
            if point == target:
                return True
    return False


def _mount(source: Path | None, target: Path, flags: int) -> None:
    if _libc.mount(os.fsencode(source) if source is not None else None, os.fsencode(target), None, flags,
                   None) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), str(target))


def _umount(target: Path) -> None:
    if _libc.umount2(os.fsencode(target), MNT_DETACH) != 0:
        e = ctypes.get_errno()
        if e not in (errno.EINVAL, errno.ENOENT):
            raise OSError(e, os.strerror(e), str(target))
