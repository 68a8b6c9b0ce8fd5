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
import re
import stat
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activator.errors import CheckpointError

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


#: the character devices runc makes in every container (its default device set, and /dev/console with a
#: terminal): name -> (major, minor). A slot's /dev is made as root on the host, so a record that came from
#: anywhere (an imported archive, an edited meta.json) may ask for these and nothing else: never a disk, /dev/mem
#: or a device node named outside the slot.
DEVICES = {"null": (1, 3), "zero": (1, 5), "full": (1, 7), "random": (1, 8), "urandom": (1, 9), "tty": (5, 0),
           "console": (5, 1), "ptmx": (5, 2)}
#: the symlinks runc makes there (fd, stdin, stdout, stderr, ptmx, core): only these targets
LINK_TARGETS = frozenset({"/proc/self/fd", "/proc/self/fd/0", "/proc/self/fd/1", "/proc/self/fd/2", "pts/ptmx",
                          "/proc/kcore"})
#: one path component: no `.` or `..`, no slash, NUL, newline or anything a shell or a config line would read
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}")
#: the external mounts a template is dumped with (mounts()): dev, shm and mask0..N
_KEY = re.compile(r"dev|shm|mask[0-9]{1,3}")


def check(e: DevEntry) -> None:
    """Refuse (CheckpointError, one line naming the entry) anything runc would not have put in /dev."""
    def bad(why: str) -> CheckpointError:
        return CheckpointError(f"checkpoint /dev entry {e.name!r} ({e.kind}) refused: {why}")

    if not isinstance(e.name, str) or not _NAME.fullmatch(e.name):
        raise bad("not a plain file name (letters, digits, _ . + -; no slash, `..`, NUL or newline)")
    if isinstance(e.mode, bool) or not isinstance(e.mode, int) or isinstance(e.rdev, bool) or \
            not isinstance(e.rdev, int) or not isinstance(e.target, str):
        raise bad("mode, rdev and target have the wrong types")
    if e.kind == "chr":
        if not 0 <= e.mode <= 0o777:
            raise bad(f"mode {e.mode:#o} (at most 0o777: no setuid, setgid or sticky bit on a device)")
        pair = (os.major(e.rdev), os.minor(e.rdev)) if 0 <= e.rdev < 1 << 64 else None
        if pair is None or DEVICES.get(e.name) != pair:
            raise bad(f"device {f'{pair[0]}:{pair[1]}' if pair else e.rdev} is not one runc makes under that name "
                      f"({', '.join(f'{n} {a}:{b}' for n, (a, b) in DEVICES.items())})")
    elif e.kind == "dir":
        if not 0 <= e.mode <= 0o1777:  # the sticky bit is what /dev/shm has; setuid and setgid never
            raise bad(f"mode {e.mode:#o} (at most 0o1777)")
    elif e.kind == "link":
        if e.target not in LINK_TARGETS:
            raise bad(f"target {e.target!r} is not one runc makes ({', '.join(sorted(LINK_TARGETS))})")
    else:
        raise bad("only character devices, directories and symlinks are made (no block devices)")


def check_external(external: dict[str, str]) -> None:
    """Refuse external mount keys and mount points other than the ones mounts() can record: a key goes into the
    instance's CRIU config, a line of text."""
    for key, point in external.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key):
            raise CheckpointError(f"checkpoint external mount key {key!r} refused: only dev, shm and maskN")
        want = {"dev": "/dev", "shm": "/dev/shm"}.get(key)
        if point != want if want is not None else point not in MASKED_PATHS:
            raise CheckpointError(f"checkpoint external mount {key!r} at {point!r} refused: not where activator "
                                  "mounts it (/dev, /dev/shm or a masked path)")


def snapshot_dev(pid: int) -> list[DevEntry]:
    """The top level of a running container's /dev, read from the host through /proc/PID/root: what runc made
    there (check()); what the app added is not recorded (a restart of the container would lose it too)."""
    root = Path(f"/proc/{pid}/root/dev")
    out = []
    for entry in sorted(os.scandir(root), key=lambda e: e.name):
        st = entry.stat(follow_symlinks=False)
        if stat.S_ISLNK(st.st_mode):
            e = DevEntry(entry.name, "link", 0o777, target=os.readlink(entry.path))
        elif stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
            e = DevEntry(entry.name, "chr" if stat.S_ISCHR(st.st_mode) else "blk", stat.S_IMODE(st.st_mode),
                         st.st_rdev)
        elif stat.S_ISDIR(st.st_mode):
            e = DevEntry(entry.name, "dir", stat.S_IMODE(st.st_mode))
        else:
            continue
        try:
            check(e)
        except CheckpointError:
            continue
        out.append(e)
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
    for e in dev:  # all of it, before anything is made on the host
        check(e)
    check_external(keys)
    where.mkdir(mode=0o700, exist_ok=True)
    ids = ""
    if owner is not None:
        os.chown(where, 0, owner)
        os.chmod(where, 0o710)
        ids = f",uid={owner},gid={owner}"
    d = where / "dev"
    _mount_tmpfs(d, MS_NOSUID | MS_STRICTATIME, "mode=755,size=65536k" + ids)
    # Relative to the new tmpfs, never a joined path: a name is one checked component, and nothing it names is
    # followed (the chmods are of what was just made in a tmpfs nobody else has seen).
    dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        for e in dev:
            if e.kind == "link":
                os.symlink(e.target, e.name, dir_fd=dfd)
            elif e.kind == "dir":
                os.mkdir(e.name, e.mode, dir_fd=dfd)
                os.chmod(e.name, e.mode, dir_fd=dfd)
            else:
                os.mknod(e.name, e.mode | stat.S_IFCHR, e.rdev, dir_fd=dfd)
                os.chmod(e.name, e.mode, dir_fd=dfd)
    finally:
        os.close(dfd)
    _mount_tmpfs(where / "shm", MS_NOSUID | MS_NODEV | MS_NOEXEC, "mode=1777,size=65536k" + ids)
    empty = where / "empty"
    empty.mkdir(mode=0o555, exist_ok=True)
    paths = {"dev": d, "shm": where / "shm"}
    paths.update({k: empty for k in keys if k.startswith("mask")})
    return paths
