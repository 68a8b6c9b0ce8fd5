"""Who owns a bind volume's files: Podman's `U` (chown the host directory to the app's user) and `idmap` (an
idmapped bind that keeps the host's owners), for host paths bound into instances in a user namespace.

`U` changes owners on the host as root, in a tree the app itself (and whoever else may write there) can change
while it is walked, so the walk is by file descriptor: every directory is opened relative to its parent with
O_NOFOLLOW, every entry is changed with lchown semantics (a symlink's own owner, never its target's), the walk
stays on the tree's file system (a mount inside it is not entered), and a file with several hard links that is
not already the service's is left alone (a link to /etc/shadow made on the same disk keeps its owner).

Paths a chown or an idmapped bind would hand to an instance are refused in one line: `/`, state_dir (or a
directory holding it), the system's own trees, a container engine's storage, and for `U` a directory another
service already owns (this state dir's record, volume-owners.json, and every activator's ranges on the host).

The chown is done before the first instance (at a checkpoint build) and again when the owner it gave changes (the
service's range, the app's uid or gid); the record says what was given, so an instance's start walks nothing.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import logging
import os
import stat
from pathlib import Path

from activator import statedir
from activator.errors import ActivatorError

from .userns import (
    AT_EMPTY_PATH,
    AT_FDCWD,
    AT_RECURSIVE,
    MOUNT_ATTR_IDMAP,
    OPEN_TREE_CLONE,
    REGISTRY,
    SIZE,
    SYS_MOUNT_SETATTR,
    SYS_OPEN_TREE,
    IdMap,
    _libc,
    _MountAttr,
    userns_fd,
)

log = logging.getLogger("activator.volumes")

RECORD = "volume-owners.json"
#: these and everything below them: the system, a container engine's storage, activator's own host-wide state
SYSTEM_TREES = ("/etc", "/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/boot", "/dev", "/proc",
                "/sys", "/run", "/var/run", "/var/lib/docker", "/var/lib/containerd", "/var/lib/containers",
                "/var/lib/activator-userns", "/var/lib/dpkg", "/var/lib/apt", "/var/log")
#: these themselves (their subdirectories are where operators keep data)
SYSTEM_DIRS = ("/", "/home", "/root", "/var", "/var/lib", "/srv", "/opt", "/tmp", "/mnt", "/media", "/var/tmp")
#: a tree deeper than this is refused rather than walked (one fd is held per level)
MAX_DEPTH = 256


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip("/") + "/")


def refusal(path: Path, state_dir: Path) -> str | None:
    """Why `option` (U or idmap) may not be used on host path `path`, or None."""
    real = os.path.realpath(path)
    shown = f"{path}" + (f" (-> {real})" if real != str(path) else "")
    if real in SYSTEM_DIRS:
        return f"{shown} is a system directory: bind a directory made for the app's data (e.g. /srv/APP)"
    for top in SYSTEM_TREES:
        if _under(real, top):
            return f"{shown} is under {top}, the system's or an engine's own files: bind a directory made for the " \
                   "app's data (e.g. /srv/APP)"
    for state in {os.path.realpath(state_dir), os.path.realpath(statedir.real(state_dir))}:  # and its bind's
        if _under(real, state) or _under(state, real):
            return f"{shown} holds or is inside state_dir ({statedir.real(state_dir)}): bind a directory outside it"
    return None


def check(path: Path, state_dir: Path, option: str, service: str) -> None:
    """ActivatorError (one line naming the service, the path and the fix) if the path is refused."""
    why = refusal(path, state_dir)
    if why is not None:
        raise ActivatorError(f"service '{service}': volumes: {option} refused on {why}")


def _read(state_dir: Path) -> dict[str, dict[str, object]]:
    try:
        data = json.loads((state_dir / RECORD).read_text())
    except (OSError, ValueError):
        return {}
    return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, dict)} \
        if isinstance(data, dict) else {}


def _write(state_dir: Path, table: dict[str, dict[str, object]]) -> None:
    from activator.statedir import write_private

    tmp = state_dir / f".{RECORD}.new"
    write_private(tmp, json.dumps(table, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, state_dir / RECORD)


def _range_holder(uid: int, registry: Path, mine: tuple[str, str]) -> str | None:
    """The service (and its state dir) whose user namespace range holds uid, if not `mine`."""
    try:
        data = json.loads(registry.read_text())
    except (OSError, ValueError):
        return None
    for sd, table in data.items() if isinstance(data, dict) else ():
        for svc, base in table.items() if isinstance(table, dict) else ():
            if isinstance(base, int) and not svc.startswith("@") and base <= uid < base + SIZE \
                    and (sd, svc) != mine:
                return f"service '{svc}' of state_dir {sd}"
    return None


def give(path: Path, state_dir: Path, service: str, user: tuple[int, int], idmap: IdMap | None,
         registry: Path = REGISTRY) -> int:
    """Blocking. `U`: give the tree at path to the app's user (user: its uid and gid inside; through idmap's
    range when there is one), unless the record says it was given so already. Returns how many entries changed."""
    check(path, state_dir, "U", service)
    real = os.path.realpath(path)
    uid, gid = (idmap.to_host(user[0]), idmap.to_host(user[1])) if idmap is not None else user
    table = _read(state_dir)
    for other, entry in table.items():
        if entry.get("service") != service and (_under(real, other) or _under(other, real)):
            raise ActivatorError(f"service '{service}': volumes: U refused on {path}: service "
                                 f"'{entry.get('service')}' already owns {other} (U); give each service its own "
                                 "directory")
    st = os.stat(real)
    holder = _range_holder(st.st_uid, registry, (str(statedir.real(state_dir).resolve()), service))
    if holder is not None and st.st_uid != uid:
        raise ActivatorError(f"service '{service}': volumes: U refused on {path}: it is owned by {holder} "
                             f"(uid {st.st_uid}); give each service its own directory")
    if table.get(real) == {"service": service, "uid": uid, "gid": gid}:
        return 0
    keep = range(idmap.host, idmap.host + idmap.size) if idmap is not None else range(uid, uid + 1)
    changed, skipped = chown_tree(Path(real), uid, gid, keep)
    if skipped:
        log.warning("service=%s volume %s: %d entries left as they are (hard links to files the service does not "
                    "own, or other file systems mounted inside)", service, path, skipped)
    log.info("service=%s volume %s: %d entries given to uid %d gid %d (U)", service, path, changed, uid, gid)
    table[real] = {"service": service, "uid": uid, "gid": gid}
    _write(state_dir, table)
    return changed


def chown_tree(root: Path, uid: int, gid: int, own: range) -> tuple[int, int]:
    """Blocking. chown every entry of the tree at root (root included) to uid:gid, walking by fd (see the module
    docstring). own: the uids a multiply-linked file may have and still be changed. Returns (changed, skipped)."""
    fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        dev = os.fstat(fd).st_dev
        changed = _set(fd, uid, gid)
        c, s = _walk(fd, dev, uid, gid, own, str(root), 1)
        return changed + c, s
    finally:
        os.close(fd)


def _set(dir_fd: int, uid: int, gid: int) -> int:
    st = os.fstat(dir_fd)
    if (st.st_uid, st.st_gid) == (uid, gid):
        return 0
    os.fchown(dir_fd, uid, gid)
    return 1


def _walk(fd: int, dev: int, uid: int, gid: int, own: range, where: str, depth: int) -> tuple[int, int]:
    if depth > MAX_DEPTH:
        raise ActivatorError(f"volumes: {where} is more than {MAX_DEPTH} directories deep; U walks no deeper")
    changed = skipped = 0
    with os.scandir(fd) as it:
        names = [e.name for e in it]
    for name in names:
        try:
            st = os.stat(name, dir_fd=fd, follow_symlinks=False)
        except FileNotFoundError:
            continue  # removed meanwhile (by the app, or whoever writes there)
        if stat.S_ISDIR(st.st_mode):
            if st.st_dev != dev:
                skipped += 1  # another file system mounted inside: not this volume's
                continue
            try:
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ENOENT, errno.ENOTDIR, errno.ELOOP):
                    continue  # swapped for something else meanwhile: not followed
                raise
            try:
                changed += _set(sub, uid, gid)
                c, s = _walk(sub, dev, uid, gid, own, f"{where}/{name}", depth + 1)
                changed, skipped = changed + c, skipped + s
            finally:
                os.close(sub)
            continue
        c, s = _set_entry(fd, name, uid, gid, own)
        changed, skipped = changed + c, skipped + s
    return changed, skipped


def _set_entry(dir_fd: int, name: str, uid: int, gid: int, own: range) -> tuple[int, int]:
    """One entry that is not a directory, judged and changed through one O_PATH descriptor: whoever writes in the
    tree may swap the name for a hard link to a file elsewhere between a look by name and a chown by name."""
    try:
        fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
    except FileNotFoundError:
        return 0, 0
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            return 0, 0  # swapped for a directory meanwhile: walked (by fd, from its parent) on the next U
        if st.st_nlink > 1 and not stat.S_ISLNK(st.st_mode) and st.st_uid not in own:
            return 0, 1  # the same file is elsewhere too, under a name this tree does not hold
        if (st.st_uid, st.st_gid) == (uid, gid):
            return 0, 0
        # AT_EMPTY_PATH: the inode fd holds (a symbolic link's own, never its target's), not a name looked up again
        if _libc.fchownat(fd, b"", uid, gid, AT_EMPTY_PATH) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e), name)
        return 1, 0
    finally:
        os.close(fd)


def idmap_unsupported(path: Path, idmap: IdMap) -> str | None:
    """Blocking. Why an idmapped bind of path cannot be made on this host (the kernel, its file system, or one
    mounted below it), or None: tried on detached copies of the mount, which go away when their fd is closed."""
    release = os.uname().release
    for recursive in (False, True):  # the tree's own file system first, then what is mounted below it
        e = _try_idmap(path, idmap, AT_RECURSIVE if recursive else 0)
        if e == errno.ENOSYS:
            return f"this kernel ({release}) has no idmapped mounts (5.12 or later has them)"
        if e and not recursive:
            return f"the file system of {path} ({_fstype(path)}) does not support idmapped mounts on kernel " \
                   f"{release} ({os.strerror(e)})"
        if e:
            return f"a file system mounted below {path} does not support idmapped mounts ({os.strerror(e)})"
    return None


def _try_idmap(path: Path, idmap: IdMap, recursive: int) -> int:
    """0, or the errno of open_tree() or mount_setattr(MOUNT_ATTR_IDMAP) on a detached copy of path's mount."""
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(path), OPEN_TREE_CLONE | os.O_CLOEXEC | recursive)
    if fd < 0:
        return ctypes.get_errno() or errno.EINVAL
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd(idmap))
        if _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | recursive, ctypes.byref(attr),
                         ctypes.sizeof(attr)) < 0:
            return ctypes.get_errno() or errno.EINVAL
        return 0
    finally:
        os.close(fd)


def _fstype(path: Path) -> str:
    """The file system type of the mount holding path (the longest mount point prefix in /proc/self/mounts)."""
    real, best, kind = os.path.realpath(path), "", "unknown"
    with contextlib.suppress(OSError), open("/proc/self/mounts") as f:
        for line in f:
            parts = line.split()
            point = parts[1].replace("\\040", " ")
            if _under(real, point) and len(point) >= len(best):
                best, kind = point, parts[2]
    return kind
