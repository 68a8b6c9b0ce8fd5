"""CRIU's images checked against what this host would have dumped for a service, before anything restores them.

A checkpoint imported from another host (transfer.py) is CRIU images that CRIU restores as root: the images say
which credentials, capabilities, seccomp filters, namespaces, mounts and files the restored processes get, and
CRIU obeys. A valid signature proves who made the image (signing.py), not that every byte of it is what that host's
own CRIU wrote (a builder fooled, or its key misused),
so every image CRIU reads is decoded (pycriu) and held against Expected: what a template of the service would
have been dumped with here. Anything else is refused in one line naming the image file and the field.

What is allowed was learned from real dumps of the demo services (runc 1.1 + CRIU 4.2, user namespace private
and host): which image files CRIU writes, the namespaces a slot makes (pid, net (external), ipc, uts, mnt, and
user unless `userns: host`; the cgroup and time namespaces are the host's), the mount tree runc builds (spec.py)
with activator's external mounts (extmounts.py), and the credentials runc gives the app. Apps may narrow their
sandbox after the dump was made (drop capabilities, change to another id of the namespace, stack seccomp
filters): that is allowed; nothing may widen it.

check_docs() is the pure part (decoded images in, DumpError out); check() reads a directory and calls it.
"""

from __future__ import annotations

import os
import posixpath
import re
import resource
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activator.errors import ActivatorError
from activator.runtime.criurestore import HOST_DEVICES
from activator.runtime.seccompref import FLAG_TSYNC, Filter
from activator.runtime.spec import MASKED_PATHS, READONLY_PATHS, ProcessSpec
from activator.runtime.userns import IdMap


class DumpError(ActivatorError):
    """A checkpoint's CRIU images hold something this host would not have dumped for the service."""


# --- bounds: a hostile image must not exhaust memory or time before it is refused --------------------------------

#: a decoded (protobuf) image larger than this is not one CRIU wrote for a container of ours
MAX_IMAGE = 8 * 2**20
#: image files in a dump; tasks; threads in all; seccomp filters in all; files; mounts
MAX_FILES, MAX_TASKS, MAX_THREADS, MAX_FILTERS, MAX_MOUNTS = 65536, 4096, 32768, 256, 256
MAX_BPF = 4096 * 8  # BPF_MAXINSNS sock_filters
#: ids a container's processes may hold (the namespace's, for `userns: host` the image's)
ID_RANGE = 65536
MAX_GROUPS = 65536

# --- capability numbers (linux/capability.h) -------------------------------------------------------------------

CAPS = ("CHOWN", "DAC_OVERRIDE", "DAC_READ_SEARCH", "FOWNER", "FSETID", "KILL", "SETGID", "SETUID", "SETPCAP",
        "LINUX_IMMUTABLE", "NET_BIND_SERVICE", "NET_BROADCAST", "NET_ADMIN", "NET_RAW", "IPC_LOCK", "IPC_OWNER",
        "SYS_MODULE", "SYS_RAWIO", "SYS_CHROOT", "SYS_PTRACE", "SYS_PACCT", "SYS_ADMIN", "SYS_BOOT", "SYS_NICE",
        "SYS_RESOURCE", "SYS_TIME", "SYS_TTY_CONFIG", "MKNOD", "LEASE", "AUDIT_WRITE", "AUDIT_CONTROL", "SETFCAP",
        "MAC_OVERRIDE", "MAC_ADMIN", "SYSLOG", "WAKE_ALARM", "BLOCK_SUSPEND", "AUDIT_READ", "PERFMON", "BPF",
        "CHECKPOINT_RESTORE")
CAP_BITS = {f"CAP_{n}": i for i, n in enumerate(CAPS)}


def cap_mask(names: Iterable[str]) -> int:
    return sum(1 << CAP_BITS[n] for n in set(names))


def cap_names(mask: int) -> list[str]:
    return [f"CAP_{CAPS[i]}" if i < len(CAPS) else f"bit {i}" for i in range(64) if mask >> i & 1]


# --- what this host would have dumped --------------------------------------------------------------------------


#: one cgroup path segment of a unit's slice: no "." or ".." (it may not start with a dot)
_SEGMENT = r"[A-Za-z0-9_@:-][A-Za-z0-9_.@:-]*"


@dataclass(frozen=True)
class Expected:
    """What a template of the service, dumped on this host, would hold.

    capabilities: the service's set (spec.capability_set(cap_add, cap_drop)); process: the spec the host
    derives (uid, gid, additional gids, tmpfs, read_only); seccomp: seccompref.reference() of the filter it
    runs under (the programs runc may install for it: every task's oldest filter must be one), () for
    `seccomp: unconfined`; external: extmounts.mounts(); volumes: the service's volume
    destinations (bind mounts runc dumps as external, keyed by destination); rlimits: the hard limit of every
    resource a template may have (this host's own, narrowed by the service's ulimits); loginuid and
    oom_score_adj: what a template inherits here; nice: the lowest nice value it may have."""

    service: str
    idmap: IdMap | None
    capabilities: frozenset[str]
    process: ProcessSpec
    seccomp: tuple[Filter, ...]
    external: dict[str, str]
    volumes: tuple[str, ...] = ()
    rlimits: tuple[int, ...] = ()
    loginuid: frozenset[int] = frozenset({0xFFFFFFFF})
    oom_score_adj: int = 0
    nice: int = 0
    #: where a template's cgroup may sit: /activator, or `instances` below a systemd service's own cgroup (the
    #: dumping daemon ran as a unit: cgroups.use_unit_cgroup), whatever the unit's slice
    cgroup_parent: str = rf"activator|(?:{_SEGMENT}/)*{_SEGMENT}\.service/instances"
    extra_files: frozenset[str] = field(default_factory=frozenset)  # image kinds allowed beyond KINDS (tests)
    # an import's cgroup.img has had its hierarchy roots removed (strip_cgroup_roots) before the check, so any
    # root left is refused; a local dump may hold this host's own (False)
    roots_stripped: bool = True


def host_limits(process: ProcessSpec) -> dict[str, Any]:
    """Blocking (reads /proc/self). The rlimits, loginuid, oom_score_adj and nice a template started by this
    process would inherit: Expected's keyword arguments."""
    from activator.config.process import ULIMITS

    hard = [resource.getrlimit(i)[1] for i in range(16)]
    hard = [(1 << 64) - 1 if h == resource.RLIM_INFINITY else h for h in hard]
    for name, _soft, h in process.rlimits:
        idx = getattr(resource, str(ULIMITS.get(name, "")), None)
        if isinstance(idx, int) and 0 <= idx < 16:
            hard[idx] = h if h >= 0 else (1 << 64) - 1
    out: dict[str, Any] = {"rlimits": tuple(hard), "nice": os.getpriority(os.PRIO_PROCESS, 0)}
    uids = {0xFFFFFFFF}
    try:
        uids.add(int(Path("/proc/self/loginuid").read_text()))
        out["oom_score_adj"] = int(Path("/proc/self/oom_score_adj").read_text())
    except (OSError, ValueError):
        pass
    out["loginuid"] = frozenset(uids)
    return out


# --- the image files CRIU writes for a container of ours --------------------------------------------------------

#: name pattern -> (pycriu magic, what its number must be: "pid", "tid", "files", "ns:KIND", "pages", "any")
KINDS: dict[str, tuple[str, str]] = {
    r"inventory\.img": ("INVENTORY", ""),
    r"pstree\.img": ("PSTREE", ""),
    r"files\.img": ("FILES", ""),
    r"seccomp\.img": ("SECCOMP", ""),
    r"cgroup\.img": ("CGROUP", ""),
    r"core-(\d+)\.img": ("CORE", "tid"),
    r"ids-(\d+)\.img": ("IDS", "pid"),
    r"mm-(\d+)\.img": ("MM", "pid"),
    r"fs-(\d+)\.img": ("FS", "pid"),
    r"pagemap-(\d+)\.img": ("PAGEMAP", "pid"),
    r"pages-(\d+)\.img": ("", "pages"),  # raw memory, not decoded
    r"fdinfo-(\d+)\.img": ("FDINFO", "files"),
    r"mountpoints-(\d+)\.img": ("MNTS", "ns:mnt_ns_id"),
    r"netns-(\d+)\.img": ("NETNS", "ns:net_ns_id"),
    r"userns-(\d+)\.img": ("USERNS", "ns:user_ns_id"),
    r"utsns-(\d+)\.img": ("UTSNS", "ns:uts_ns_id"),
    r"ipcns-var-(\d+)\.img": ("IPC_VAR", "ns:ipc_ns_id"),
    r"ipcns-shm-(\d+)\.img": ("IPCNS_SHM", "ns:ipc_ns_id"),
    r"ipcns-msg-(\d+)\.img": ("IPCNS_MSG", "ns:ipc_ns_id"),
    r"ipcns-sem-(\d+)\.img": ("IPCNS_SEM", "ns:ipc_ns_id"),
    r"timens-0\.img": ("TIMENS", ""),
    # what apps' descriptors add (JVMs, databases): contents, no paths or privileges of their own
    r"pipes-data\.img": ("PIPES_DATA", ""),
    r"fifo-data\.img": ("FIFO_DATA", ""),
    r"sk-queues\.img": ("SK_QUEUES", ""),
    r"tcp-stream-([0-9a-f]+)\.img": ("TCP_STREAM", "any"),
    r"eventpoll-tfd\.img": ("EVENTPOLL_TFD", ""),
    r"inotify-wd\.img": ("INOTIFY_WD", ""),
    r"remap-fpath\.img": ("REMAP_FPATH", ""),
    r"ghost-file-([0-9a-f]+)\.img": ("GHOST_FILE", "any"),
    r"memfd\.img": ("MEMFD_INODE", ""),
    r"filelocks\.img": ("FILE_LOCKS", ""),
}
#: runc's own (JSON): the paths of the app's stdio at dump time
DESCRIPTORS = "descriptors.json"
#: CRIU's own logs and statistics in the image directory, never read on restore
IGNORED = re.compile(r"(dump|restore)\.log|stats-(dump|restore)")
#: payload images pycriu reads with their data (decoded with no_payload: the data is not looked at)
PAYLOAD = {"PIPES_DATA", "FIFO_DATA", "SK_QUEUES", "TCP_STREAM", "GHOST_FILE", "IPCNS_SHM", "IPCNS_MSG",
           "IPCNS_SEM"}

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
#: devices.list lines runc writes for a container of ours (cgroup v1): nothing else may be allowed
DEVICE_RULES = {"b *:* m", "c *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 5:0 rwm",
                "c 5:1 rwm", "c 5:2 rwm", "c 10:200 rwm", "c 136:* rwm"}
#: seccomp filter flags a stacked filter may carry (TSYNC, LOG, SPEC_ALLOW); never NEW_LISTENER and the like
STACKED_FLAGS = 1 | 2 | 4
#: thread scheduling policies open to an unprivileged process (SCHED_OTHER, _BATCH, _IDLE)
SCHED_POLICIES = {0, 3, 5}
NS_KINDS = ("pid_ns_id", "net_ns_id", "ipc_ns_id", "uts_ns_id", "mnt_ns_id", "user_ns_id", "cgroup_ns_id",
            "time_ns_id")


def _int(v: Any) -> int:
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, str):
        return int(v, 0)
    raise ValueError(f"not a number: {v!r}")


class _Refuse:
    """Builds the one line: `dump refused: IMAGE: FIELD: why`."""

    def __init__(self, expected: Expected) -> None:
        self.svc = expected.service
        self.current = "dump"  # the image being read: a malformed field anywhere in it is named by it

    def __call__(self, image: str, what: str, why: str) -> DumpError:
        return DumpError(f"service '{self.svc}': checkpoint refused: {image}: {what}: {why}")


# --- reading ----------------------------------------------------------------------------------------------------


def load_docs(images: Path, expected: Expected) -> dict[str, Any]:
    """Blocking. Every image file in the directory, decoded (name -> pycriu's dict; raw files -> None;
    descriptors.json -> its list). Refuses unknown names, oversized or undecodable files, and a wrong magic."""
    import json

    from activator.runtime.preflight import require_pycriu

    refuse = _Refuse(expected)
    pycriu = require_pycriu()
    docs: dict[str, Any] = {}
    try:
        names = sorted(os.listdir(images))
    except OSError as e:
        raise refuse(str(images), "directory", e.strerror or str(e)) from None
    if len(names) > MAX_FILES:
        raise refuse(str(images), "files", f"{len(names)} files (at most {MAX_FILES})")
    for name in names:
        if IGNORED.fullmatch(name):
            continue
        path = images / name
        st = os.lstat(path)
        if not (st.st_mode & S_IFMT == 0o100000):
            raise refuse(name, "file", "not a regular file")
        kind = kind_of(name, expected)
        if kind is None:
            raise refuse(name, "file", "not an image CRIU writes for a container of this host")
        magic, _ = kind
        if name == DESCRIPTORS:
            if st.st_size > 2**20:
                raise refuse(name, "size", f"{st.st_size} bytes")
            try:
                docs[name] = json.loads(path.read_bytes())
            except (ValueError, RecursionError):
                raise refuse(name, "file", "not JSON") from None
            continue
        if not magic:
            docs[name] = None
            continue
        if magic not in PAYLOAD and st.st_size > MAX_IMAGE:
            raise refuse(name, "size", f"{st.st_size} bytes (at most {MAX_IMAGE} for this kind)")
        try:
            with open(path, "rb") as f:
                doc = pycriu.images.load(f, no_payload=magic in PAYLOAD)
        except Exception as e:  # pycriu raises whatever its decoder meets in a crafted file
            raise refuse(name, "decode", f"not a CRIU image ({type(e).__name__})") from None
        if not isinstance(doc, dict) or doc.get("magic") != magic:
            raise refuse(name, "magic", f"{doc.get('magic') if isinstance(doc, dict) else '?'} (expected {magic})")
        docs[name] = doc
    return docs


def kind_of(name: str, expected: Expected | None = None) -> tuple[str, str] | None:
    if name == DESCRIPTORS:
        return ("json", "")
    for pattern, kind in KINDS.items():
        if re.fullmatch(pattern, name):
            return kind
    if expected is not None and name in expected.extra_files:
        return ("", "")
    return None


def strip_cgroup_roots(images: Path) -> int:
    """Blocking. Remove from cgroup.img the directories it records at the roots of hierarchies (dir_name ""):
    the dumping host's own cgroup tree outside the container (Docker's, for a v1 controller runc did not manage
    there), which CRIU in runc's restore mode would create on this host. A restore needs none of it: the task's
    set still names the root, where an instance here stays. Returns how many were removed."""
    from activator.runtime.preflight import require_pycriu

    path = images / "cgroup.img"
    if not path.is_file() or path.stat().st_size > MAX_IMAGE:
        return 0  # missing: nothing to strip; too large: check() refuses it
    pycriu = require_pycriu()
    try:
        with open(path, "rb") as f:
            doc = pycriu.images.load(f)
        removed = 0
        for entry in doc["entries"]:
            for c in entry.get("controllers", []):
                kept = [d for d in c.get("dirs", []) if d.get("dir_name") != ""]
                removed += len(c.get("dirs", [])) - len(kept)
                if kept:
                    c["dirs"] = kept
                else:
                    c.pop("dirs", None)  # pycriu cannot encode an empty repeated field
    except Exception:  # pycriu raises whatever its decoder meets in a crafted file: check() names it
        return 0
    if removed:
        tmp = path.with_name(path.name + ".new")
        with open(tmp, "wb") as f:
            pycriu.images.dump(doc, f)
        os.replace(tmp, path)
    return removed


def check(images: Path, expected: Expected) -> None:
    """Blocking. Refuse (DumpError, one line naming the image file and field) a dump holding anything a template
    of the service dumped on this host would not."""
    check_docs(load_docs(images, expected), expected)


# --- the checks (pure) ------------------------------------------------------------------------------------------


def _entries(docs: dict[str, Any], name: str, refuse: _Refuse) -> list[dict[str, Any]]:
    refuse.current = name
    doc = docs.get(name)
    if doc is None:
        raise refuse(name, "file", "missing")
    entries = doc.get("entries") if isinstance(doc, dict) else None
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise refuse(name, "entries", "not a list of entries")
    return entries


def _one(docs: dict[str, Any], name: str, refuse: _Refuse) -> dict[str, Any]:
    entries = _entries(docs, name, refuse)
    if len(entries) != 1:
        raise refuse(name, "entries", f"{len(entries)} entries (expected 1)")
    return entries[0]


def check_docs(docs: dict[str, Any], expected: Expected) -> None:
    """Pure. docs: image file name -> decoded image (pycriu's dicts), as load_docs() makes them."""
    refuse = _Refuse(expected)
    try:
        _check(docs, expected, refuse)
    except DumpError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as e:
        # a field of the wrong shape somewhere a check did not expect one: still a refusal, never a crash
        raise refuse(refuse.current, "structure", f"malformed ({type(e).__name__}: {str(e)[:80]})") from None


def _check(docs: dict[str, Any], expected: Expected, refuse: _Refuse) -> None:
    inv = _one(docs, "inventory.img", refuse)
    tasks = _pstree(docs, refuse)
    root_ids = inv.get("root_ids")
    if not isinstance(root_ids, dict):
        raise refuse("inventory.img", "root_ids", "missing")
    _inventory(inv, refuse)
    ns = _namespaces(docs, tasks, root_ids, expected, refuse)
    _names(docs, tasks, ns, expected, refuse)
    mounts = _mounts(docs, ns["mnt_ns_id"], expected, refuse)
    files = _files(docs, mounts, ns, expected, refuse)
    _fdinfo(docs, tasks, files, refuse)
    _cores(docs, tasks, expected, refuse)
    _userns(docs, ns, expected, refuse)
    _netns(docs, ns, refuse)
    _cgroups(docs, expected, refuse)
    _descriptors(docs, refuse)
    for name in docs:
        if name.startswith("utsns-"):
            uts = _one(docs, name, refuse)
            for k in ("nodename", "domainname"):
                if len(str(uts.get(k, ""))) > 64:
                    raise refuse(name, k, "longer than 64 characters")


def _inventory(inv: dict[str, Any], refuse: _Refuse) -> None:
    if _int(inv.get("img_version", 0)) != 2:
        raise refuse("inventory.img", "img_version", f"{inv.get('img_version')} (expected 2)")
    if inv.get("lsmtype", "NO_LSM") not in ("NO_LSM", 0):
        raise refuse("inventory.img", "lsmtype", f"{inv.get('lsmtype')} (this host dumps without an LSM)")
    plugins = inv.get("plugins_entry") or {}
    if plugins.get("plugins"):
        raise refuse("inventory.img", "plugins_entry", f"CRIU plugins {plugins['plugins']} (none are used here)")
    if inv.get("allow_uprobes"):
        raise refuse("inventory.img", "allow_uprobes", "set (never here)")


def _pstree(docs: dict[str, Any], refuse: _Refuse) -> list[tuple[int, list[int]]]:
    entries = _entries(docs, "pstree.img", refuse)
    if not 1 <= len(entries) <= MAX_TASKS:
        raise refuse("pstree.img", "entries", f"{len(entries)} tasks (1 to {MAX_TASKS})")
    pids: set[int] = set()
    tids: set[int] = set()
    out = []
    for i, e in enumerate(entries):
        pid, ppid = _int(e["pid"]), _int(e["ppid"])
        threads = [_int(t) for t in e.get("threads", [])]
        if not 0 < pid < 1 << 22 or pid in pids:
            raise refuse("pstree.img", f"pid {pid}", "out of range or repeated")
        if (i == 0) != (ppid == 0) or (i and ppid not in pids):
            raise refuse("pstree.img", f"ppid of {pid}", f"{ppid}: not the root's 0 or an earlier task")
        if not threads or threads[0] != pid or len(set(threads)) != len(threads) or tids & set(threads) \
                or any(not 0 < t < 1 << 22 for t in threads):
            raise refuse("pstree.img", f"threads of {pid}", "must start with the pid, unique, in range")
        pids.add(pid)
        tids.update(threads)
        if len(tids) > MAX_THREADS:
            raise refuse("pstree.img", "threads", f"more than {MAX_THREADS}")
        out.append((pid, threads))
    for e in entries:
        for k in ("pgid", "sid"):
            if _int(e[k]) not in pids:
                raise refuse("pstree.img", f"{k} of {e['pid']}", f"{e[k]}: not a task of the dump")
    return out


def _namespaces(docs: dict[str, Any], tasks: list[tuple[int, list[int]]], root_ids: dict[str, Any],
                expected: Expected, refuse: _Refuse) -> dict[str, int]:
    """Every task in the one set of namespaces a slot makes: its own pid, net, ipc, uts, mnt (and user, unless
    `userns: host`) namespaces; the host's cgroup and time namespaces."""
    own = {"pid_ns_id", "net_ns_id", "ipc_ns_id", "uts_ns_id", "mnt_ns_id"} | (
        {"user_ns_id"} if expected.idmap is not None else set())
    first: dict[str, int] | None = None
    for pid, _ in tasks:
        name = f"ids-{pid}.img"
        ids = _one(docs, name, refuse)
        got = {k: _int(ids[k]) if k in ids else None for k in NS_KINDS}
        for k in NS_KINDS:
            host = _int(root_ids[k]) if k in root_ids else None
            if got[k] is None:
                raise refuse(name, k, "missing")
            if (k in own) == (got[k] == host):
                raise refuse(name, k, f"{got[k]}: {'the host namespace' if k in own else 'a namespace of its own'}"
                                      f" ({'a slot gives it its own' if k in own else 'a slot keeps the host one'})")
        if first is None:
            first = {k: v for k, v in got.items() if v is not None}
        elif any(got[k] != first[k] for k in NS_KINDS):
            raise refuse(name, "namespaces", "differ from the first task's (a slot holds one set)")
    assert first is not None
    return first


def _names(docs: dict[str, Any], tasks: list[tuple[int, list[int]]], ns: dict[str, int], expected: Expected,
           refuse: _Refuse) -> None:
    """Per-task and per-namespace images only for the dump's tasks and namespaces."""
    pids = {p for p, _ in tasks}
    tids = {t for _, ts in tasks for t in ts}
    for name in docs:
        kind = kind_of(name, expected)
        if kind is None:
            raise refuse(name, "file", "not an image CRIU writes for a container of this host")
        m = re.search(r"-(\d+)\.img$", name)
        num = int(m.group(1)) if m else None
        what = kind[1]
        ok = {"pid": num in pids, "tid": num in tids, "": True, "any": True, "files": True,
              "pages": num is not None and num < 1 << 20}.get(what, False)
        if what.startswith("ns:"):
            ok = num == ns.get(what[3:])
        if not ok:
            raise refuse(name, "file", "names no task or namespace of the dump")
    for pid, threads in tasks:
        for need in (f"ids-{pid}.img", f"mm-{pid}.img", f"fs-{pid}.img", *(f"core-{t}.img" for t in threads)):
            if need not in docs:
                raise refuse(need, "file", "missing")


def _mounts(docs: dict[str, Any], mnt_ns: int, expected: Expected, refuse: _Refuse) -> dict[int, dict[str, Any]]:
    """The mount tree runc builds for a container of ours (spec.runtime_spec), nothing more: each mountpoint of
    the expected kind, source and flags; external mounts only under the keys activator and runc give them."""
    name = f"mountpoints-{mnt_ns}.img"
    entries = _entries(docs, name, refuse)
    if not 1 <= len(entries) <= MAX_MOUNTS:
        raise refuse(name, "entries", f"{len(entries)} mounts (1 to {MAX_MOUNTS})")
    by_id: dict[int, dict[str, Any]] = {}
    for e in entries:
        mid = _int(e["mnt_id"])
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
        fstype, root, key = _int(e["fstype"]), str(e["root"]), e.get("ext_key")
        flags = _int(e["flags"])
        if not _clean(point):
            raise refuse(name, where, "not a clean absolute path")
        if point in seen:
            raise refuse(name, where, "mounted twice")
        seen.add(point)
        if _int(e.get("shared_id", 0)) or _int(e.get("master_id", 0)) or e.get("with_plugin") or e.get("deleted"):
            raise refuse(name, where, "shared, slave, plugin or deleted mount (a slot has none)")
        parent = _int(e["parent_mnt_id"])
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
            cur = _int(by_id[cur]["parent_mnt_id"])
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


def _files(docs: dict[str, Any], mounts: dict[int, dict[str, Any]], ns: dict[str, int], expected: Expected,
           refuse: _Refuse) -> dict[int, str]:
    """files.img: each descriptor's file a kind an app of ours may hold, paths inside the container's mounts,
    devices only runc's default ones."""
    name = "files.img"
    entries = _entries(docs, name, refuse) if name in docs else []
    if len(entries) > 1 << 20:
        raise refuse(name, "entries", f"{len(entries)} files")
    kinds: dict[int, str] = {}
    caps = expected.capabilities
    for e in entries:
        fid = _int(e["id"])
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
            mid = _int(reg.get("mnt_id", -1))
            if mid not in mounts:
                raise refuse(name, f"{where} mnt_id", f"{mid}: not a mount of the dump")
            if reg.get("ext"):
                raise refuse(name, where, "an external file (never here)")
            mode = _int(reg.get("mode", 0))
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
            if "ns_id" in sk and _int(sk["ns_id"]) != ns["net_ns_id"]:
                raise refuse(name, f"{where} ns_id", "not the slot's network namespace")
    return kinds


def _clean_name(text: str) -> bool:
    return _clean(text) if text.startswith("/") else ".." not in text.split("/") and "\n" not in text


def _fdinfo(docs: dict[str, Any], tasks: list[tuple[int, list[int]]], files: dict[int, str],
            refuse: _Refuse) -> None:
    for name in docs:
        if not name.startswith("fdinfo-"):
            continue
        for e in _entries(docs, name, refuse):
            fid, fd = _int(e["id"]), _int(e["fd"])
            if fid not in files:
                raise refuse(name, f"fd {fd}", f"file id {fid} is not in files.img")
            if not 0 <= fd < 1 << 20:
                raise refuse(name, f"fd {fd}", "out of range")


def _caps_word(words: Any) -> int:
    ws = [_int(w) for w in (words or [])]
    if len(ws) > 2 or any(not 0 <= w < 1 << 32 for w in ws):
        raise ValueError("capability words")
    return sum(w << (32 * i) for i, w in enumerate(ws))


def _cores(docs: dict[str, Any], tasks: list[tuple[int, list[int]]], expected: Expected, refuse: _Refuse) -> None:
    allowed = cap_mask(expected.capabilities)
    p = expected.process
    seccomp = _seccomp_chains(docs, expected, refuse)
    for pid, threads in tasks:
        # CRIU dumps a chain all threads share only on the leader, flagged TSYNC (restored into every thread at
        # once), and the other threads as "disabled" (criu/seccomp.c try_use_tsync): the leader is read first.
        propagated = False
        for tid in sorted(threads, key=lambda t: t != pid):
            name = f"core-{tid}.img"
            core = _one(docs, name, refuse)
            if core.get("mtype") not in ("X86_64", 1) and os.uname().machine == "x86_64":
                raise refuse(name, "mtype", f"{core.get('mtype')} (this host is x86_64)")
            tc = core.get("tc") or {}
            th = core.get("thread_core")
            if tid == pid:
                _task_core(name, tc, expected, refuse)
            if not isinstance(th, dict):
                raise refuse(name, "thread_core", "missing")
            creds = th.get("creds")
            if not isinstance(creds, dict):
                raise refuse(name, "creds", "missing")
            _creds(name, creds, allowed, p, expected, refuse)
            chain = _thread_seccomp(name, th, seccomp, expected, refuse, propagated=tid != pid and propagated)
            if tid == pid:
                propagated = bool(chain) and all(_int(f.get("flags", 0)) & FLAG_TSYNC for f in chain)
            if _int(th.get("sched_policy", 0)) not in SCHED_POLICIES:
                raise refuse(name, "sched_policy", f"{th.get('sched_policy')} (real-time needs CAP_SYS_NICE)")
            if _int(th.get("sched_nice", 0)) < expected.nice:
                raise refuse(name, "sched_nice", f"{th.get('sched_nice')} (at least {expected.nice})")


def _task_core(name: str, tc: dict[str, Any], expected: Expected, refuse: _Refuse) -> None:
    if "old_seccomp_mode" in tc or "old_seccomp_filter" in tc:
        raise refuse(name, "tc.old_seccomp_mode", "set (CRIU would use it in place of the thread's)")
    if "loginuid" in tc and _int(tc["loginuid"]) not in expected.loginuid:
        raise refuse(name, "tc.loginuid", f"{tc['loginuid']} (a template here has {sorted(expected.loginuid)})")
    if _int(tc.get("oom_score_adj", expected.oom_score_adj)) < expected.oom_score_adj:
        raise refuse(name, "tc.oom_score_adj", f"{tc['oom_score_adj']} (at least {expected.oom_score_adj})")
    rl = (tc.get("rlimits") or {}).get("rlimits") or []
    if len(rl) > 16:
        raise refuse(name, "tc.rlimits", f"{len(rl)} limits")
    for i, r in enumerate(rl):
        cur, mx = _int(r["cur"]), _int(r["max"])
        bound = expected.rlimits[i] if i < len(expected.rlimits) else (1 << 64) - 1
        if mx > bound or cur > mx:
            raise refuse(name, f"tc.rlimits[{i}]", f"{cur}/{mx} (the hard limit here is at most {bound})")


def _creds(name: str, c: dict[str, Any], allowed: int, p: ProcessSpec, expected: Expected, refuse: _Refuse) -> None:
    for k in ("cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb"):
        mask = _caps_word(c.get(k))
        if mask & ~allowed:
            raise refuse(name, f"creds.{k}", f"{', '.join(cap_names(mask & ~allowed))} beyond the service's set")
    # ids: those of the process spec, or (an app started as root) any id of the container's range
    for ids, own in ((("uid", "euid", "suid", "fsuid"), p.uid), (("gid", "egid", "sgid", "fsgid"), p.gid)):
        for k in ids:
            v = _int(c[k])
            if not (0 <= v < (expected.idmap.size if expected.idmap else ID_RANGE) if p.uid == 0 else v == own):
                why = "outside the user namespace's ids" if p.uid == 0 else f"the app runs as {own}"
                raise refuse(name, f"creds.{k}", f"{v} ({why})")
    held = [_int(g) for g in c.get("groups", [])]
    if len(held) > MAX_GROUPS:
        raise refuse(name, "creds.groups", f"{len(held)} groups")
    top = expected.idmap.size if expected.idmap else ID_RANGE
    for g in held:
        if not 0 <= g < top or (p.uid != 0 and g not in (p.gid, *p.additional_gids)):
            raise refuse(name, "creds.groups", f"{g} (not among the app's groups)")
    secbits = _int(c.get("secbits", 0))
    if not 0 <= secbits < 256:
        raise refuse(name, "creds.secbits", f"{secbits:#x} (unknown bits)")
    if _int(c.get("no_new_privs", 0)) != 1:
        raise refuse(name, "creds.no_new_privs", f"{c.get('no_new_privs', 0)} (a slot sets it)")
    for k in ("lsm_profile", "lsm_sockcreate", "apparmor_data"):
        if c.get(k) not in (None, "", "unconfined"):
            raise refuse(name, f"creds.{k}", "an LSM label (a slot sets none)")


def _seccomp_chains(docs: dict[str, Any], expected: Expected, refuse: _Refuse) -> list[dict[str, Any]]:
    if "seccomp.img" not in docs:
        return []
    entries = _entries(docs, "seccomp.img", refuse)
    if len(entries) > 1:
        raise refuse("seccomp.img", "entries", f"{len(entries)} (expected 1)")
    filters = entries[0].get("seccomp_filters", []) if entries else []
    if len(filters) > MAX_FILTERS:
        raise refuse("seccomp.img", "seccomp_filters", f"{len(filters)} filters (at most {MAX_FILTERS})")
    return list(filters)


def _program(f: dict[str, Any]) -> bytes:
    import base64

    raw = f.get("filter", b"")
    return raw if isinstance(raw, bytes) else base64.b64decode(str(raw))


def _thread_seccomp(name: str, th: dict[str, Any], filters: list[dict[str, Any]], expected: Expected,
                    refuse: _Refuse, *, propagated: bool = False) -> list[dict[str, Any]]:
    """The thread's chain (CRIU: its index names the oldest filter, `prev` leads to newer ones) must start with
    the reference; newer filters may only have been stacked by the app (they can only restrict). propagated: the
    leader's chain is all TSYNC, so a thread dumped without one gets the leader's at restore. Returns the chain."""
    mode = th.get("seccomp_mode", "disabled")
    mode = {0: "disabled", 1: "strict", 2: "filter"}.get(mode, mode) if isinstance(mode, int) else mode
    if not expected.seccomp:
        if mode not in ("disabled", "filter"):
            raise refuse(name, "thread_core.seccomp_mode", f"{mode}")
        if mode == "disabled":
            return []
    elif mode == "disabled" and propagated and "seccomp_filter" not in th:
        return []
    elif mode != "filter":
        raise refuse(name, "thread_core.seccomp_mode", f"{mode} (the service runs under a seccomp filter)")
    idx = _int(th.get("seccomp_filter", -1))
    chain: list[dict[str, Any]] = []
    seen: set[int] = set()
    while True:
        if not 0 <= idx < len(filters) or idx in seen:
            raise refuse("seccomp.img", f"filter {idx} (of {name})", "missing or a loop in the chain")
        seen.add(idx)
        chain.append(filters[idx])
        if "prev" not in filters[idx]:
            break
        idx = _int(filters[idx]["prev"])
    for i, f in enumerate(chain):
        prog = _program(f)
        if not 0 < len(prog) <= MAX_BPF or len(prog) % 8:
            raise refuse("seccomp.img", f"filter {i} of {name}", f"{len(prog)} bytes: not a BPF program")
        flags = _int(f.get("flags", 0))
        if i == 0 and expected.seccomp:
            if not any(seccomp_matches(prog, ref.program) and flags & ~FLAG_TSYNC == ref.flags & ~FLAG_TSYNC
                       for ref in expected.seccomp):
                raise refuse("seccomp.img", f"filter {i} of {name}", "not the filter this host installs for the "
                                                                       "service's seccomp profile")
        elif flags & ~STACKED_FLAGS:
            raise refuse("seccomp.img", f"filter {i} of {name} flags", f"{flags:#x}")
    return chain


def _userns(docs: dict[str, Any], ns: dict[str, int], expected: Expected, refuse: _Refuse) -> None:
    if expected.idmap is None:
        if any(n.startswith("userns-") for n in docs):
            raise refuse(next(n for n in docs if n.startswith("userns-")), "file", "userns: host has none")
        return
    name = f"userns-{ns['user_ns_id']}.img"
    e = _one(docs, name, refuse)
    want = [{"first": 0, "lower_first": expected.idmap.host, "count": expected.idmap.size}]
    for k in ("uid_map", "gid_map"):
        got = [{x: _int(ext.get(x, -1)) for x in ("first", "lower_first", "count")} for ext in e.get(k, [])]
        if got != want:
            raise refuse(name, k, f"{got[:2]} (this host's range for the service is {expected.idmap})")


def _netns(docs: dict[str, Any], ns: dict[str, int], refuse: _Refuse) -> None:
    """The network namespace is the slot's, joined (runc's extRootNetNS), never one CRIU would build."""
    name = f"netns-{ns['net_ns_id']}.img"
    if name not in docs:
        raise refuse(name, "file", "missing")
    e = _one(docs, name, refuse)
    if set(e) != {"ext_key"} or e["ext_key"] != "extRootNetNS":
        raise refuse(name, "ext_key", "not the external namespace a slot gives (its devices, addresses or rules "
                                      "would be made by CRIU)")


def _cgroups(docs: dict[str, Any], expected: Expected, refuse: _Refuse) -> None:
    if "cgroup.img" not in docs:
        return
    e = _one(docs, "cgroup.img", refuse)
    pattern = re.compile(rf"/?(?:{expected.cgroup_parent})/[A-Za-z0-9_-][A-Za-z0-9_.-]*")
    for s in e.get("sets", []):
        for ctl in s.get("ctls", []):
            # "/": a hierarchy runc does not manage on the dumping host (a v1 controller only a container engine
            # mounted, e.g. hugetlb, net_cls or perf_event after Docker ran a container): the template stayed
            # at its root, as an instance here does; nothing is created or set there (strip_cgroup_roots)
            if ctl.get("path") != "/" and not pattern.fullmatch(str(ctl.get("path", ""))):
                raise refuse("cgroup.img", "sets.ctls.path", f"{str(ctl.get('path'))[:80]!r}")
    for c in e.get("controllers", []):
        for d in c.get("dirs", []):
            where = f"controllers {c.get('cnames')}"
            if d.get("dir_name") == "" and expected.roots_stripped is False:
                continue  # the dumping host's own tree of an unmanaged hierarchy: a local dump, this host's
            if not pattern.fullmatch(str(d.get("dir_name", ""))):
                raise refuse("cgroup.img", f"{where} dir_name", f"{str(d.get('dir_name'))[:80]!r}")
            if d.get("children"):
                raise refuse("cgroup.img", f"{where} children", "a template has no cgroups below its own")
            for prop in d.get("properties", []):
                if prop.get("name") == "devices.list":
                    extra = set(str(prop.get("value", "")).splitlines()) - DEVICE_RULES
                    if extra:
                        raise refuse("cgroup.img", f"{where} devices.list", f"{sorted(extra)[:3]} beyond runc's")


def _descriptors(docs: dict[str, Any], refuse: _Refuse) -> None:
    d = docs.get(DESCRIPTORS)
    if d is None:
        return
    if not isinstance(d, list) or len(d) > 3 or not all(isinstance(x, str) for x in d):
        raise refuse(DESCRIPTORS, "entries", "not the app's three stdio paths")
    for x in d:
        if not (x == "/dev/null" or re.fullmatch(r"(pipe|socket|anon_inode):\[?[0-9A-Za-z_-]*\]?", x)):
            raise refuse(DESCRIPTORS, repr(x)[:60], "stdio must be /dev/null, a pipe or a socket")


# --- runc's seccomp stub ------------------------------------------------------------------------------------------

BPF_LD_W_ABS, BPF_JA, BPF_RET_K = 0x20, 0x05, 0x06
BPF_COND = {0x15, 0x25, 0x35, 0x45}  # jeq, jgt, jge, jset with a constant
RET_ENOSYS = 0x00050000 | 38  # SECCOMP_RET_ERRNO | ENOSYS


def _insns(program: bytes) -> list[tuple[int, int, int, int]]:
    import struct

    return [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program) - len(program) % 8, 8)]


def _stub_length(program: bytes) -> int:
    """runc's stub ends with its `ret ERRNO(ENOSYS)`; the body (libseccomp's program) starts after it."""
    for i, (code, _jt, _jf, k) in enumerate(_insns(program)[:256]):
        if code == BPF_RET_K:
            return i + 1 if k == RET_ENOSYS else 0
    return 0


def seccomp_matches(program: bytes, reference: bytes) -> bool:
    """Is `program` the reference up to runc's stub? Its libseccomp body must be the reference's byte for byte,
    and what comes before it only loads seccomp_data, jumps forward within itself or to the body's first
    instruction, and returns -ENOSYS: such a stub can refuse more calls than the body but allow none it refuses,
    whatever order runc put its blocks in."""
    if program == reference:
        return True
    n = _stub_length(reference)
    body = reference[n * 8:]
    if not body or len(program) <= len(body) or not program.endswith(body) or (len(program) - len(body)) % 8:
        return False
    stub = _insns(program[: len(program) - len(body)])
    end = len(stub)
    for i, (code, jt, jf, k) in enumerate(stub):
        if code == BPF_LD_W_ABS:
            if k >= 64 or k % 4:  # inside struct seccomp_data
                return False
        elif code == BPF_JA:
            if i + 1 + k > end:
                return False
        elif code in BPF_COND:
            if i + 1 + jt > end or i + 1 + jf > end:
                return False
        elif code == BPF_RET_K:
            if k != RET_ENOSYS:
                return False
        else:
            return False
    return True
