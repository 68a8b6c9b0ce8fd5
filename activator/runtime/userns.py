"""User namespaces: root in an instance is an unprivileged uid on the host.

Every service gets a range of 65536 host uids and gids of its own (container ids 0-65535 map to BASE..BASE+65535),
so one tenant's root is not another's; all instances of a service share its range, as they share its checkpoint
and volumes. Ranges come from a pool: the `activator` entries of /etc/subuid and /etc/subgid when there are
(Docker's userns-remap takes `dockremap`'s the same way), else DEFAULT_POOL, which sits far above the ids
useradd hands out and the ranges it delegates (100000 and up). A service keeps its range across restarts
(state_dir/userns.json): its checkpoint and its volumes' files are owned by it. No two activators on a host hand
out the same range (Ranges: a host-wide registry), and no range holds an id the host's users or groups have
(HostIds: through NSS, directory services included, and /etc/subuid, /etc/subgid): whoever has such an id would
own an instance's files and processes.

Files, as the mapped ids see them:
- the image's root filesystem is not copied or chowned: each instance's overlay gets it through an idmapped
  mount (mount_setattr(MOUNT_ATTR_IDMAP), measured on ext4 under overlayfs: about 0.1 ms, plus one short-lived
  process per service to hold a user namespace with the range's mapping);
- the instance's upper directory and the checkpoint's diff layer are owned by the range (what the app wrote);
- activator's named volumes are owned by the range (shift_tree, once, when one made before is first used so);
- bind volumes from the host are bound as they are: the app sees host uid BASE+N as N and everything else as
  nobody (65534), as with Docker's userns-remap.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import grp
import json
import os
import pwd
import stat
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from activator.errors import ActivatorError

SIZE = 65536
#: 2^30 .. 2^31 - 1: 16383 services of 65536 ids, below the ids some tools treat as negative (>= 2^31)
DEFAULT_POOL = (1 << 30, (1 << 30) - SIZE)
POOL_USER = "activator"
STATE = "userns.json"
#: every activator's ranges on this host (Ranges)
REGISTRY = Path("/var/lib/activator-userns/ranges.json")
#: in a state dir's registry entry: the device its state dir was on (a key no service name can be)
DEVICE = "@dev"
#: NSS sources getpwall()/getgrall() enumerate completely; any other (sss, ldap, winbind, nis, ...) may hold
#: users it does not list, so a candidate range is then also asked about id by id
ENUMERATED = {"files", "compat", "db", "systemd", "altfiles", "extrausers", "cache", "mymachines", "resolve"}

_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long
SYS_OPEN_TREE, SYS_MOVE_MOUNT, SYS_MOUNT_SETATTR = 428, 429, 442  # the same on every architecture
OPEN_TREE_CLONE = 1
AT_FDCWD, AT_EMPTY_PATH, AT_RECURSIVE = -100, 0x1000, 0x8000
MOVE_MOUNT_F_EMPTY_PATH = 0x4
MOUNT_ATTR_IDMAP = 0x00100000


class _MountAttr(ctypes.Structure):
    _fields_ = [("attr_set", ctypes.c_uint64), ("attr_clr", ctypes.c_uint64), ("propagation", ctypes.c_uint64),
                ("userns_fd", ctypes.c_uint64)]


@dataclass(frozen=True)
class IdMap:
    """Container ids 0..size-1 are host ids host..host+size-1 (uids and gids alike)."""

    host: int
    size: int = SIZE

    def __str__(self) -> str:
        return f"{self.host}:{self.size}"

    @classmethod
    def parse(cls, text: str) -> IdMap:
        host, _, size = text.partition(":")
        return cls(int(host), int(size or SIZE))

    def to_host(self, cid: int) -> int:
        return self.host + cid if 0 <= cid < self.size else cid

    def oci(self) -> list[dict[str, int]]:
        return [{"containerID": 0, "hostID": self.host, "size": self.size}]


def pool(subuid: Path = Path("/etc/subuid"), subgid: Path = Path("/etc/subgid")) -> tuple[int, int]:
    """(first id, count) ranges are handed out from: the `activator` user's subordinate ids when both files
    name the same range for it, else DEFAULT_POOL (refused in one line if it overlaps a range delegated there)."""
    uids, gids = _subids(subuid), _subids(subgid)
    mine = [r for r in uids.get(POOL_USER, []) if r in gids.get(POOL_USER, []) and r[1] >= SIZE]
    if mine:
        return max(mine, key=lambda r: r[1])
    lo, count = DEFAULT_POOL
    for path, table in ((subuid, uids), (subgid, gids)):
        for user, ranges in table.items():
            for start, n in ranges:
                if start < lo + count and lo < start + n:
                    raise ActivatorError(
                        f"{path}: {user}'s subordinate ids {start}-{start + n - 1} overlap the ids activator gives "
                        f"its instances ({lo}-{lo + count - 1}); give activator its own range with an "
                        f"'{POOL_USER}:START:COUNT' line in /etc/subuid and /etc/subgid")
    return DEFAULT_POOL


def _subids(path: Path) -> dict[str, list[tuple[int, int]]]:
    out: dict[str, list[tuple[int, int]]] = {}
    with contextlib.suppress(OSError):
        for line in path.read_text().splitlines():
            parts = line.strip().split(":")
            if len(parts) == 3 and parts[1].isdigit() and parts[2].isdigit():
                out.setdefault(parts[0], []).append((int(parts[1]), int(parts[2])))
    return out


class HostIds:
    """The ids the host's users and groups have, to keep ranges off them: what NSS enumerates (pwd.getpwall(),
    grp.getgrall(): /etc/passwd, systemd's users, and any source that lists its users), the ranges /etc/subuid and
    /etc/subgid delegate to other users, and, when nsswitch.conf names a source that need not list its users (a
    directory service: SSSD's ids reach 2,000,200,000 by default, inside the pool), each id of a candidate range
    asked for by getpwuid()/getgrgid() (once, when a service is first given a range; 2 x 65536 lookups)."""

    def __init__(self, nsswitch: Path = Path("/etc/nsswitch.conf"), subuid: Path = Path("/etc/subuid"),
                 subgid: Path = Path("/etc/subgid")) -> None:
        self.nsswitch, self.subuid, self.subgid = nsswitch, subuid, subgid
        self._known: list[tuple[int, int, str]] | None = None

    # the NSS calls, replaced by fakes in tests
    def users(self) -> list[tuple[str, int]]:
        return [(u.pw_name, u.pw_uid) for u in pwd.getpwall()]

    def groups(self) -> list[tuple[str, int]]:
        return [(g.gr_name, g.gr_gid) for g in grp.getgrall()]

    def user_by_id(self, uid: int) -> str | None:
        try:
            return pwd.getpwuid(uid).pw_name
        except KeyError:
            return None

    def group_by_id(self, gid: int) -> str | None:
        try:
            return grp.getgrgid(gid).gr_name
        except KeyError:
            return None

    def unlisted_sources(self) -> list[str]:
        """Sources of the passwd and group databases whose users getpwall()/getgrall() need not list."""
        found: list[str] = []
        with contextlib.suppress(OSError):
            for line in self.nsswitch.read_text().splitlines():
                db, _, rest = line.partition("#")[0].partition(":")
                if db.strip() in ("passwd", "group"):
                    found += [w for w in rest.split() if not w.startswith("[") and w not in ENUMERATED]
        return sorted(set(found))

    def _listed(self) -> list[tuple[int, int, str]]:
        """(first, last, who) of every id or range known by listing (read once)."""
        if self._known is None:
            known = [(i, i, f"user {n}") for n, i in self.users()] + [(i, i, f"group {n}") for n, i in self.groups()]
            for path in (self.subuid, self.subgid):
                for user, ranges in _subids(path).items():
                    if user != POOL_USER:
                        known += [(a, a + n - 1, f"{user}'s subordinate ids in {path}") for a, n in ranges]
            self._known = sorted(known)
        return self._known

    def conflict(self, start: int, size: int = SIZE) -> str | None:
        """Who on this host has an id in start..start+size-1, or None."""
        last = start + size - 1
        for first, end, who in self._listed():
            if end >= start and first <= last:
                return f"{who} ({first})" if first == end else f"{who} ({first}-{end})"
        if self.unlisted_sources():
            for i in range(start, start + size):
                if (name := self.user_by_id(i)) is not None:
                    return f"user {name} ({i})"
                if (name := self.group_by_id(i)) is not None:
                    return f"group {name} ({i})"
        return None


class Ranges:
    """Which range each service has (state_dir/userns.json, 0600), handed out from the pool and kept.

    Ranges are unique on the host, not only within one state dir: several activators (each its own state dir)
    share the pool, so every allocation is also recorded in a host-wide registry (REGISTRY, flock()ed), where
    the ranges of state dirs that no longer exist are freed.

    A range is never freed because a file is missing for a while (a state dir on a disk not mounted yet): only
    a state dir gone from a filesystem that is there (_gone). A state dir whose userns.json is missing gets its
    table back from the registry; a kept range another state dir holds is refused in one line; a new range is
    one no host user or group has an id in (HostIds)."""

    def __init__(self, root: Path, registry: Path | None = None, ids: HostIds | None = None) -> None:
        self.root = root
        self.path = root / STATE
        self.registry = registry or REGISTRY
        self.ids = ids or HostIds()
        self._lock = threading.Lock()

    def for_service(self, service: str) -> IdMap:
        """Blocking. The service's range, given one the first time it is asked for."""
        from activator.statedir import real

        with self._lock, self._registry() as others:
            mine = str(real(self.root).resolve())  # the configured state_dir, not its bind under /run
            recorded = {k: v for k, v in others.get(mine, {}).items() if k != DEVICE}
            table = self._read()
            if table is None:  # never written, or gone: what the registry knows of this state dir
                table = dict(recorded)
                if table:
                    self._write(table)
            start, count = pool()
            holders = {b: sd for sd, t in others.items() if sd != mine for k, b in t.items() if k != DEVICE}
            base = table.get(service)
            if base is not None and base in holders:
                raise ActivatorError(
                    f"service '{service}': its user namespace range {base}-{base + SIZE - 1} ({self.path}) is also "
                    f"held by the activator of {holders[base]}: their instances would share ids; remove "
                    f"'{service}' from {self.path} to give it a new range (its checkpoint is then rebuilt)")
            if base is None or not (start <= base and base + SIZE <= start + count):
                used = set(holders) | set(table.values())
                base, skipped = None, []
                for b in range(start, start + count - SIZE + 1, SIZE):
                    if b in used:
                        continue
                    if who := self.ids.conflict(b):
                        skipped.append(who)
                        continue
                    base = b
                    break
                if base is None:
                    raise ActivatorError(f"no user namespace range is left for service '{service}': the pool "
                                         f"{start}-{start + count - 1} is used up"
                                         + (f" (ranges skipped for host ids, e.g. {skipped[0]})" if skipped else "")
                                         + f"; give '{POOL_USER}' a larger range in /etc/subuid and /etc/subgid")
                table[service] = base
                self._write(table)
            with contextlib.suppress(OSError):
                others[mine] = {**table, DEVICE: os.stat(self.root).st_dev}
            return IdMap(base)

    def _write(self, table: dict[str, int]) -> None:
        from activator.statedir import write_private

        tmp = self.path.with_name(f".{STATE}.new")
        write_private(tmp, json.dumps(table, indent=1, sort_keys=True) + "\n")
        os.replace(tmp, self.path)

    @contextlib.contextmanager
    def _registry(self) -> Iterator[dict[str, dict[str, int]]]:
        """The host-wide table {state dir: {service: first id}}, locked while the body runs, written after it."""
        from activator.statedir import write_private

        self.registry.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
        fd = os.open(self.registry.with_suffix(".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            try:
                data = json.loads(self.registry.read_text())
            except (OSError, ValueError):
                data = {}
            table = {sd: {k: v for k, v in t.items() if isinstance(v, int)} for sd, t in data.items()
                     if isinstance(t, dict) and not _gone(Path(sd), t.get(DEVICE))}
            yield table
            tmp = self.registry.with_name(f".{self.registry.name}.new")
            write_private(tmp, json.dumps(table, indent=1, sort_keys=True) + "\n")
            os.replace(tmp, self.registry)
        finally:
            os.close(fd)

    def _read(self) -> dict[str, int] | None:
        try:
            data = json.loads(self.path.read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as e:
            raise ActivatorError(f"{self.path} is unreadable ({e}); remove it to give services new ranges (their "
                                 "checkpoints are then rebuilt)") from None
        return {k: v for k, v in data.items() if isinstance(k, str) and isinstance(v, int)}


def _gone(state_dir: Path, device: object) -> bool:
    """Is this state dir gone for good, so its ranges may be given to others? Only if it does not exist and the
    filesystem it was on is there (its nearest existing parent is on that device): a disk not mounted (yet), an
    unreadable or missing userns.json, or an entry without a device (an older activator's) keeps its ranges."""
    if not isinstance(device, int) or os.path.lexists(state_dir):
        return False
    for parent in state_dir.parents:
        try:
            return os.stat(parent).st_dev == device
        except FileNotFoundError:
            continue
        except OSError:
            return False
    return False


_holders: dict[IdMap, int] = {}
_holders_lock = threading.Lock()


def userns_fd(idmap: IdMap) -> int:
    """Blocking. An fd on a user namespace with idmap's mapping (made once per range and kept: a mount keeps
    what it needs of it, so one serves every idmapped mount of the range)."""
    with _holders_lock:
        fd = _holders.get(idmap)
        if fd is None:
            fd = _holders[idmap] = _new_userns(idmap)
        return fd


def _new_userns(idmap: IdMap) -> int:
    with holding(idmap) as pid:
        return os.open(f"/proc/{pid}/ns/user", os.O_RDONLY | os.O_CLOEXEC)


@contextlib.contextmanager
def holding(idmap: IdMap, *, net: bool = False) -> Iterator[int]:
    """Blocking. A helper process in a new user namespace with idmap's mapping (and, with net, a new network
    namespace owned by it), alive while the body runs: its pid, whose /proc/PID/ns/* the body opens or binds.

    The helper unshares and waits on stdin; the maps are written from here (root in the parent namespace may
    map any ids, which the helper itself could not)."""
    helper = subprocess.Popen(["unshare", "--user", *(["--net"] if net else []), "cat"], stdin=subprocess.PIPE,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    assert helper.stdin is not None
    try:
        own = os.stat("/proc/self/ns/user").st_ino
        deadline = time.monotonic() + 5
        while True:
            try:
                if os.stat(f"/proc/{helper.pid}/ns/user").st_ino != own:
                    break
            except FileNotFoundError:
                pass
            if helper.poll() is not None or time.monotonic() > deadline:
                err = helper.stderr.read().decode(errors="replace").strip() if helper.stderr else ""
                raise ActivatorError(f"cannot make a user namespace: {err or 'unshare --user did not start'}")
            time.sleep(0.001)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{helper.pid}/{name}", "w") as f:
                f.write(f"0 {idmap.host} {idmap.size}\n")
        yield helper.pid
    finally:
        with contextlib.suppress(OSError):
            helper.stdin.close()
        try:
            helper.wait(timeout=5)
        except subprocess.TimeoutExpired:
            helper.kill()
            helper.wait()
        if helper.stderr is not None:
            helper.stderr.close()


def idmapped_mount(source: Path, target: Path, idmap: IdMap) -> None:
    """Blocking. Mount a copy of source on target with its ids seen through idmap (file uid N reads as host
    uid idmap.host + N), recursive and read-write as source is."""
    target.mkdir(mode=0o700, exist_ok=True)
    fd = _libc.syscall(SYS_OPEN_TREE, AT_FDCWD, os.fsencode(source), OPEN_TREE_CLONE | os.O_CLOEXEC | AT_RECURSIVE)
    if fd < 0:
        raise _oserror(f"open_tree({source})")
    try:
        attr = _MountAttr(MOUNT_ATTR_IDMAP, 0, 0, userns_fd(idmap))
        if _libc.syscall(SYS_MOUNT_SETATTR, fd, b"", AT_EMPTY_PATH | AT_RECURSIVE, ctypes.byref(attr),
                         ctypes.sizeof(attr)) < 0:
            raise _oserror(f"idmapping a mount of {source} (mount_setattr)")
        if _libc.syscall(SYS_MOVE_MOUNT, fd, b"", AT_FDCWD, os.fsencode(target), MOVE_MOUNT_F_EMPTY_PATH) < 0:
            raise _oserror(f"mounting {source} on {target} (move_mount)")
    finally:
        os.close(fd)


def shift_tree(root: Path, idmap: IdMap) -> int:
    """Blocking. Give container-native ownership (ids below idmap.size, as an image or Docker has them) the
    range's host ids, in place; ids already shifted are left alone. Returns how many entries changed.

    chown() clears set-user-ID and set-group-ID bits (even root's), so a file's mode is put back after it."""
    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for name in [None, *dirnames, *filenames]:
            path = dirpath if name is None else os.path.join(dirpath, name)
            if name is None and dirpath != str(root):
                continue  # directories are handled as entries of their parent
            st = os.lstat(path)
            uid, gid = idmap.to_host(st.st_uid), idmap.to_host(st.st_gid)
            if (uid, gid) == (st.st_uid, st.st_gid):
                continue
            os.lchown(path, uid, gid)
            if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
                os.chmod(path, stat.S_IMODE(st.st_mode))
            changed += 1
    return changed


def move_tree(root: Path, old: IdMap, new: IdMap) -> int:
    """Blocking. Files owned by range `old` owned by the same ids of range `new` (a checkpoint made on another
    host, whose range for the service differs); other owners are left alone. Returns how many entries changed."""

    def move(i: int) -> int:
        return new.host + (i - old.host) if old.host <= i < old.host + old.size else i

    changed = 0
    for dirpath, dirnames, filenames in os.walk(root):
        for path in [dirpath] if dirpath == str(root) else []:
            changed += _rechown(path, move)
        for name in (*dirnames, *filenames):
            changed += _rechown(os.path.join(dirpath, name), move)
    return changed


def _rechown(path: str, move: Callable[[int], int]) -> int:
    st = os.lstat(path)
    uid, gid = move(st.st_uid), move(st.st_gid)
    if (uid, gid) == (st.st_uid, st.st_gid):
        return 0
    os.lchown(path, uid, gid)
    if not stat.S_ISLNK(st.st_mode) and st.st_mode & (stat.S_ISUID | stat.S_ISGID):
        os.chmod(path, stat.S_IMODE(st.st_mode))  # chown() cleared them
    return 1


def check_passable(path: Path) -> None:
    """An instance's root (an unprivileged uid on the host) must pass through every directory above its own to
    reach its root filesystem and volumes, as runc and CRIU mount them by path: one line naming the first that
    lets no other user pass (o+x), with the fix. activator makes state_dir and instances/ so itself."""
    for d in [path.resolve(), *path.resolve().parents][1:]:
        try:
            mode = os.stat(d).st_mode
        except OSError:
            continue
        if not mode & stat.S_IXOTH:
            raise ActivatorError(
                f"{d} lets no other user pass (mode {stat.S_IMODE(mode):o}): instances in a user namespace reach "
                f"their files below it by path; `chmod o+x {d}` (passing through lists and reads nothing), move "
                "settings.state_dir, or set 'userns: host'")


def supported(criu_version: str) -> bool:
    """Does this CRIU restore into a user namespace with a net namespace made outside it (activator's patch,
    scripts/criu-patches/)? check_criu's version string carries the build's GitID."""
    return "+activator-userns." in criu_version


def _oserror(what: str) -> OSError:
    e = ctypes.get_errno()
    return OSError(e, f"{what}: {os.strerror(e)}")


