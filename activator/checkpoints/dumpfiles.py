"""A dump's mounts and open files (pure): the mount tree runc builds for a container of ours and nothing more;
each descriptor's file a kind an app of ours may hold, inside the container's mounts; stdio a pipe, a socket or
/dev/null."""

from __future__ import annotations

import posixpath
import re
from typing import Any

from activator.runtime.criurestore import HOST_DEVICES
from activator.runtime.spec import MASKED_PATHS, READONLY_PATHS

from .dumpexpected import MAX_MOUNTS, Expected, Refuse, as_int, entries_of

#: runc's own (JSON): the paths of the app's stdio at dump time
DESCRIPTORS = "descriptors.json"
# file_entry types a container of ours may hold, and who may not
FILE_TYPES = {"REG", "PIPE", "FIFO", "INETSK", "UNIXSK", "EVENTFD", "EVENTPOLL", "INOTIFY", "SIGNALFD", "NETLINKSK",
              "TIMERFD", "MEMFD", "PIDFD", "PACKETSK"}
FD_TYPE_NAMES = {0: "UND", 1: "REG", 2: "PIPE", 3: "FIFO", 4: "INETSK", 5: "UNIXSK", 6: "EVENTFD", 7: "EVENTPOLL",
                 8: "INOTIFY", 9: "SIGNALFD", 10: "PACKETSK", 11: "TTY", 12: "FANOTIFY", 13: "NETLINKSK", 14: "NS",
                 15: "TUNF", 16: "EXT", 17: "TIMERFD", 18: "MEMFD", 19: "BPFMAP", 20: "PIDFD"}
# mount flags (MS_*), fstypes (mnt.proto)
MS_RDONLY, MS_NOSUID, MS_NODEV, MS_NOEXEC = 1, 2, 4, 8
PROC, SYSFS, DEVTMPFS, TMPFS, DEVPTS, MQUEUE, OVERLAYFS = 1, 2, 3, 5, 6, 14, 17
#: the character devices an app may hold open (runc's default set, a pty of its own): path -> allowed
DEVICE_PATHS = {"/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom", "/dev/tty", "/dev/console",
                "/dev/ptmx", "/dev/pts/ptmx"}
_PTS = re.compile(r"/dev/pts/[0-9]{1,6}")
S_IFMT, S_IFCHR, S_IFBLK = 0o170000, 0o020000, 0o060000


def check_mounts(docs: dict[str, Any], mnt_ns: int, expected: Expected, refuse: Refuse) -> dict[int, dict[str, Any]]:
    """The mount tree runc builds for a container of ours (spec.runtime_spec), nothing more: each mountpoint of
    the expected kind, source and flags; external mounts only under the keys activator and runc give them."""
    name = f"mountpoints-{mnt_ns}.img"
    entries = entries_of(docs, name, refuse)
    if not 1 <= len(entries) <= MAX_MOUNTS:
        raise refuse(name, "entries", f"{len(entries)} mounts (1 to {MAX_MOUNTS})")
    by_id: dict[int, dict[str, Any]] = {}
    for e in entries:
        mid = as_int(e["mnt_id"])
        if mid in by_id:
            raise refuse(name, f"mnt_id {mid}", "repeated")
        by_id[mid] = e
    ext_by_point = {point: key for key, point in expected.external.items()}
    masked_files = {p for p in MASKED_PATHS if p not in expected.external.values()}
    tmpfs = {t: opts for t, opts in expected.process.tmpfs}
    roots = 0
    seen: set[str] = set()
    for mid, e in by_id.items():
        point = str(e["mountpoint"])
        where = f"mount {point!r}"
        fstype, root, key = as_int(e["fstype"]), str(e["root"]), e.get("ext_key")
        flags = as_int(e["flags"])
        if not _clean(point):
            raise refuse(name, where, "not a clean absolute path")
        if point in seen:
            raise refuse(name, where, "mounted twice")
        seen.add(point)
        if as_int(e.get("shared_id", 0)) or as_int(e.get("master_id", 0)) or e.get("with_plugin") or e.get("deleted"):
            raise refuse(name, where, "shared, slave, plugin or deleted mount (a slot has none)")
        parent = as_int(e["parent_mnt_id"])
        if point == "/":
            roots += 1
            if fstype != OVERLAYFS or root != "/" or key is not None:
                raise refuse(name, where, "the root must be the instance's overlay")
            need = MS_RDONLY if expected.process.read_only else 0
        else:
            if parent not in by_id or parent == mid:
                raise refuse(name, where, f"parent {parent} is not a mount of the dump")
            wanted = _expected_mount(point, fstype, root, key, ext_by_point, masked_files, tmpfs, expected)
            if wanted is None:
                raise refuse(name, where, f"fstype {fstype}, root {root!r}, external key {key!r}: not a mount a "
                                          "slot makes")
            need = wanted
        if flags & need != need:
            raise refuse(name, f"{where} flags", f"{flags:#x} lacks {need & ~flags:#x} (nosuid/nodev/noexec/ro)")
    if roots != 1:
        raise refuse(name, "mount '/'", f"{roots} root mounts (expected 1)")
    # the tree: every parent chain reaches the root without a cycle
    for mid in by_id:
        cur, steps = mid, 0
        while str(by_id[cur]["mountpoint"]) != "/":
            cur = as_int(by_id[cur]["parent_mnt_id"])
            steps += 1
            if steps > len(by_id):
                raise refuse(name, f"mount {by_id[mid]['mountpoint']!r}", "its parents loop")
    return by_id


def _expected_mount(point: str, fstype: int, root: str, key: Any, ext_by_point: dict[str, str],
                    masked_files: set[str], tmpfs: dict[str, tuple[str, ...]], expected: Expected) -> int | None:
    """The flags a mount must carry if it is one a slot makes at that point; None if it is not one."""
    strict = MS_NOSUID | MS_NODEV | MS_NOEXEC
    if point in ext_by_point:  # activator's own: /dev, /dev/shm, masked directories
        ok = key == ext_by_point[point]
        return (MS_NOSUID if point == "/dev" else strict if point == "/dev/shm" else MS_RDONLY) if ok else None
    if point == "/sys" and key is not None:  # in a user namespace: the slot's sysfs, bound (spec.runtime_spec)
        return strict | MS_RDONLY if key == "/sys" and expected.idmap is not None and root == "/" else None
    if point in masked_files:  # a masked file: /dev/null bound over it (runc)
        return 0 if key == "/dev/null" and root == "/null" and fstype in (DEVTMPFS, TMPFS) else None
    if point in HOST_DEVICES:  # runc binds the host's devices, and maps them again on restore
        return 0 if key == point and root == point.removeprefix("/dev") and fstype in (DEVTMPFS, TMPFS) else None
    if point in expected.volumes:
        return 0 if key == point else None
    if key is not None:
        return None
    if point == "/proc":
        return strict if fstype == PROC and root == "/" else None
    if point in READONLY_PATHS:
        return strict | MS_RDONLY if fstype == PROC and root == point.removeprefix("/proc") else None
    if point == "/sys":
        return strict | MS_RDONLY if fstype == SYSFS and root == "/" else None
    if point == "/dev/pts":
        return MS_NOSUID | MS_NOEXEC if fstype == DEVPTS and root == "/" else None
    if point == "/dev/mqueue":
        return strict if fstype == MQUEUE and root == "/" else None
    if point in tmpfs:
        opts = tmpfs[point]
        need = sum(f for o, f in (("nosuid", MS_NOSUID), ("nodev", MS_NODEV), ("noexec", MS_NOEXEC),
                                  ("ro", MS_RDONLY)) if o in opts)
        return need if fstype == TMPFS and root == "/" else None
    return None


def _clean(path: str) -> bool:
    """An absolute path with no `.`, `..`, empty components, NUL or newline."""
    return (path.startswith("/") and "\0" not in path and "\n" not in path and len(path) < 4096
            and posixpath.normpath(path) == path and "/../" not in path + "/" and not path.startswith("//"))


def check_files(docs: dict[str, Any], mounts: dict[int, dict[str, Any]], ns: dict[str, int], expected: Expected,
           refuse: Refuse) -> dict[int, str]:
    """files.img: each descriptor's file a kind an app of ours may hold, paths inside the container's mounts,
    devices only runc's default ones."""
    name = "files.img"
    entries = entries_of(docs, name, refuse) if name in docs else []
    if len(entries) > 1 << 20:
        raise refuse(name, "entries", f"{len(entries)} files")
    kinds: dict[int, str] = {}
    caps = expected.capabilities
    for e in entries:
        fid = as_int(e["id"])
        t = e["type"]
        kind = FD_TYPE_NAMES.get(t, "?") if isinstance(t, int) else str(t)
        where = f"file id {fid} ({kind})"
        if kind not in FILE_TYPES or (kind == "PACKETSK" and "CAP_NET_RAW" not in caps):
            raise refuse(name, where, "a kind of file a container of ours cannot hold")
        if fid in kinds:
            raise refuse(name, where, "id repeated")
        kinds[fid] = kind
        if kind == "REG":
            reg = e.get("reg")
            if not isinstance(reg, dict):
                raise refuse(name, where, "no reg entry")
            path = str(reg.get("name", ""))
            if not _clean(path):
                raise refuse(name, f"{where} name {path[:80]!r}", "not a clean absolute path inside the container")
            mid = as_int(reg.get("mnt_id", -1))
            if mid not in mounts:
                raise refuse(name, f"{where} mnt_id", f"{mid}: not a mount of the dump")
            if reg.get("ext"):
                raise refuse(name, where, "an external file (never here)")
            mode = as_int(reg.get("mode", 0))
            if mode & S_IFMT == S_IFBLK:
                raise refuse(name, f"{where} {path!r}", "a block device")
            if mode & S_IFMT == S_IFCHR and path not in DEVICE_PATHS and not _PTS.fullmatch(path):
                raise refuse(name, f"{where} {path!r}", "a character device outside runc's default set")
            point = str(mounts[mid]["mountpoint"])
            if not (point == "/" or path == point or path.startswith(point.rstrip("/") + "/")):
                raise refuse(name, f"{where} {path!r}", f"not below its mount {point!r}")
        elif kind == "UNIXSK":
            usk = e.get("usk") or {}
            raw = usk.get("name", "")
            text = raw if isinstance(raw, str) else ""
            if text and not text.startswith("\0") and not text.startswith("@") and not _clean_name(text):
                raise refuse(name, f"{where} name", "a socket path outside the container")
            if usk.get("name_dir") and not _clean(str(usk["name_dir"])):
                raise refuse(name, f"{where} name_dir", "not a clean absolute path")
        elif kind in ("INETSK", "PACKETSK", "NETLINKSK"):
            sk = e.get({"INETSK": "isk", "PACKETSK": "psk", "NETLINKSK": "nlsk"}[kind]) or {}
            if "ns_id" in sk and as_int(sk["ns_id"]) != ns["net_ns_id"]:
                raise refuse(name, f"{where} ns_id", "not the slot's network namespace")
    return kinds


def _clean_name(text: str) -> bool:
    return _clean(text) if text.startswith("/") else ".." not in text.split("/") and "\n" not in text


def check_fdinfo(docs: dict[str, Any], tasks: list[tuple[int, list[int]]], files: dict[int, str],
            refuse: Refuse) -> None:
    for name in docs:
        if not name.startswith("fdinfo-"):
            continue
        for e in entries_of(docs, name, refuse):
            fid, fd = as_int(e["id"]), as_int(e["fd"])
            if fid not in files:
                raise refuse(name, f"fd {fd}", f"file id {fid} is not in files.img")
            if not 0 <= fd < 1 << 20:
                raise refuse(name, f"fd {fd}", "out of range")


def check_descriptors(docs: dict[str, Any], refuse: Refuse) -> None:
    d = docs.get(DESCRIPTORS)
    if d is None:
        return
    if not isinstance(d, list) or len(d) > 3 or not all(isinstance(x, str) for x in d):
        raise refuse(DESCRIPTORS, "entries", "not the app's three stdio paths")
    for x in d:
        if not (x == "/dev/null" or re.fullmatch(r"(pipe|socket|anon_inode):\[?[0-9A-Za-z_-]*\]?", x)):
            raise refuse(DESCRIPTORS, repr(x)[:60], "stdio must be /dev/null, a pipe or a socket")
