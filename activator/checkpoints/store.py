"""The checkpoint store: one pre-warmed, dumped template per service (builder.py makes them).

Layout of state_dir/checkpoints/SERVICE/ (0700: the dump is the app's memory):
    meta.json      what it was made from (image ID, CRIU/runc versions, kernel, seccomp profile, service
                   fingerprint) and what it holds (process spec, seccomp filter, listening ports, sizes); a
                   mismatch on any "made from" field is stale
    criu/          CRIU's image files, as runc checkpoint wrote them
    diff/          the template's filesystem changes, used read-only as an overlay layer by every instance
    template.log   the template app's output up to the dump

This is all the runtime path (instances, services) needs: the record and where its files are.
"""

from __future__ import annotations

import bisect
import contextlib
import ipaddress
import json
import os
import re
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from activator.core.probes import Answer
from activator.runtime.extmounts import DevEntry, dev_from_json
from activator.runtime.spec import ProcessSpec
from activator.runtime.userns import IdMap
from activator.statedir import StateDir, write_private

# 2: dumped with network-lock skip (runc.CRIU_CONFIG); a dump made with the lock also pays for it on every
#    restore (~70 ms of the ~155), so older checkpoints are rebuilt.
# 3: the template runs under a seccomp filter (Docker's default profile unless the service says otherwise), which
#    CRIU dumps with the process; older dumps would restore instances without one.
# 4: dumped with tcp-close (established connections restored closed), the template on the instance network
#    (network: bridge), and what the app listens on recorded (kernel_path).
# 5: /dev, /dev/shm and the masked directories dumped as external mounts (extmounts.py), /dev snapshotted.
# 6: no CAP_NET_RAW by default (cap_add/cap_drop), /sys/devices/virtual/powercap masked, eth0 without IPv6 and
#    with a MAC derived from its address: a process dumped with the old set would keep it on restore.
# 7: templates and instances in a user namespace of their service (userns.py), dumped and restored through it.
FORMAT = 7
USED = "used"


@dataclass(frozen=True)
class Origin:
    """What a checkpoint was made from; any difference means it must be rebuilt."""

    format: int
    service_fingerprint: str
    image_id: str
    criu: str
    runc: str
    kernel: str
    seccomp: str  # digest of the filter the template ran under, or "unconfined"
    userns: str = "host"  # the user namespace range it was dumped in ("HOST_ID:SIZE"), or "host" for none

    def differences(self, other: Origin) -> list[str]:
        return [k for k, v in asdict(self).items() if asdict(other)[k] != v]


@dataclass(frozen=True)
class Checkpoint:
    service: str
    dir: Path
    origin: Origin
    process: ProcessSpec
    image_rootfs: Path
    listening_ports: tuple[int, ...]
    created: float
    build_seconds: float
    pages_bytes: int
    seccomp: dict[str, Any] | None  # linux.seccomp of the template's spec; instances get the same
    kernel_path: bool  # the app listens on every address, so the kernel can steer clients to an instance's eth0
    external: dict[str, str]  # key -> mountpoint of the mounts dumped as external (extmounts.py)
    dev: tuple[DevEntry, ...]  # the template's /dev, rebuilt for every instance
    stop_signal: str = "SIGTERM"  # the image's STOPSIGNAL (the service's stop_signal overrides it)
    writes_volumes: tuple[str, ...] = ()  # files of writable volumes the app held open for writing (core.pool.stateful)
    probe_answers: tuple[tuple[str, Answer], ...] = ()  # (path, what the template answered it): probes
    # where an imported checkpoint came from and who signed it ("" for one built here): what an operator needs
    # after a signing key is rotated or stolen, to find what was installed under it
    provenance: str = ""
    # what in the dumped app makes restore_memory: map unsafe for it ("jemalloc (PATH)"; maphazard.py), or ""
    map_hazard: str = ""

    def probe_answer(self, path: str) -> Answer | None:
        return next((a for p, a in self.probe_answers if p == path), None)


    @property
    def images(self) -> Path:
        return self.dir / "criu"

    @property
    def used(self) -> bool:
        """Has an instance run from it (a stateful one is then made again: core.pool.stateful)?"""
        return (self.dir / USED).exists()

    def mark_used(self) -> None:
        """Blocking."""
        write_private(self.dir / USED, "")

    @property
    def idmap(self) -> IdMap | None:
        """The user namespace range every instance of it runs in (its files are owned by it)."""
        return None if self.origin.userns == "host" else IdMap.parse(self.origin.userns)

    @property
    def diff(self) -> Path:
        return self.dir / "diff"

    @property
    def layers(self) -> list[Path]:
        """Overlay lower dirs for an instance, topmost first."""
        return [self.diff, self.image_rootfs]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["probe_answers"] = [[path, a.to_json()] for path, a in self.probe_answers]
        d["dir"] = str(self.dir)
        d["image_rootfs"] = str(self.image_rootfs)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], directory: Path) -> Checkpoint:
        p = d["process"]
        return cls(
            service=d["service"],
            dir=directory,
            origin=Origin(**d["origin"]),
            process=ProcessSpec(
                args=tuple(p["args"]), env=tuple(p["env"]), cwd=p["cwd"], uid=p["uid"], gid=p["gid"],
                additional_gids=tuple(p["additional_gids"]),
                **({"capabilities": tuple(p["capabilities"])} if "capabilities" in p else {}),  # format < 6
                # absent from checkpoints made before these keys existed (made without them)
                rlimits=tuple((r[0], r[1], r[2]) for r in p.get("rlimits", ())),
                read_only=p.get("read_only", False),
                tmpfs=tuple((t, tuple(o)) for t, o in p.get("tmpfs", ())),
            ),
            image_rootfs=Path(d["image_rootfs"]),
            listening_ports=tuple(d["listening_ports"]),
            created=d["created"],
            build_seconds=d["build_seconds"],
            pages_bytes=d["pages_bytes"],
            seccomp=d["seccomp"],
            kernel_path=d["kernel_path"],
            external=dict(d["external"]),
            dev=dev_from_json(d["dev"]),
            stop_signal=d.get("stop_signal", "SIGTERM"),  # absent from checkpoints made before it was kept
            writes_volumes=tuple(d.get("writes_volumes", ())),
            probe_answers=tuple((str(path), Answer.from_json(a)) for path, a in d.get("probe_answers", ())),
            provenance=str(d.get("provenance", "")),
            # absent from checkpoints made before the check (b06e2ef), including some made by a CRIU that maps
            map_hazard=str(d.get("map_hazard", "")),
        )


# --- reading a dump with pycriu ------------------------------------------------------------------------------


def _load_img(path: Path) -> dict[str, Any]:
    from activator.runtime.preflight import require_pycriu

    pycriu = require_pycriu()
    with open(path, "rb") as f:
        result: dict[str, Any] = pycriu.images.load(f)
    return result


def _listener(entry: dict[str, Any], proto: str) -> bool:
    """A TCP listener, or (proto UDP) a UDP socket, which has no listening state: any bound one."""
    if proto == "UDP":
        return entry.get("proto") in ("UDP", 17)
    return entry.get("proto") in ("TCP", 6) and entry.get("state") in ("LISTEN", 10)


def listening_ports(images: Path, proto: str = "TCP") -> tuple[int, ...]:
    """TCP ports the dumped processes listen on (or UDP ports they are bound to), read from CRIU's image files."""
    ports: set[int] = set()
    for isk in _socket_entries(images):
        if _listener(isk, proto):
            src = isk.get("src_port", [])
            ports.update(int(p) for p in (src if isinstance(src, list) else [src]))
    return tuple(sorted(ports))


def listening_addresses(images: Path, port: int, proto: str = "TCP") -> list[str]:
    """The addresses the dumped app listens on for port ("0.0.0.0", "127.0.0.1", ...; "::" only for a
    dual-stack socket, "::/v6only" for one that takes IPv6 alone)."""
    found = []
    for e in _socket_entries(images):
        if not _listener(e, proto):
            continue
        src = e.get("src_port", [])
        if port not in (src if isinstance(src, list) else [src]):
            continue
        raw = e.get("src_addr", [])
        words = raw if isinstance(raw, list) else [raw]
        if words and isinstance(words[0], str):  # some pycriu versions decode addresses already
            found.append(words[0])
            continue
        packed = b"".join(int(w).to_bytes(4, "little") for w in words)
        addr = str(ipaddress.ip_address(packed)) if len(packed) in (4, 16) else "?"
        found.append(addr + "/v6only" if e.get("v6only") else addr)
    return found


def _socket_entries(images: Path) -> list[dict[str, Any]]:
    entries: list[dict[str, Any]] = []
    for name in ("files.img", "inetsk.img"):  # newer CRIU keeps sockets in files.img, older in inetsk.img
        if (images / name).exists():
            entries += _load_img(images / name)["entries"]
    return [e.get("isk", e) for e in entries if "isk" in e or "src_port" in e]


O_ACCMODE = 0o3


def files_written(images: Path, under: list[str]) -> tuple[str, ...]:
    """Regular files below any of the directories `under` (container paths) that the dumped processes held open
    for writing, read from CRIU's image files."""
    if not under:
        return ()
    roots = [u.rstrip("/") + "/" for u in under]
    found = set()
    for e in _load_img(images / "files.img")["entries"] if (images / "files.img").exists() else []:
        reg = e.get("reg") if e.get("type") in ("REG", 1) else None
        if not reg or not (int(reg.get("flags", 0)) & O_ACCMODE):
            continue
        name = str(reg.get("name", ""))
        if any(name.startswith(r) or name + "/" == r for r in roots):
            found.add(name)
    return tuple(sorted(found))


def pages_bytes(images: Path) -> int:
    return sum(p.stat().st_size for p in images.glob("pages-*.img"))


def _int(v: Any) -> int:
    return int(v, 16) if isinstance(v, str) else int(v)


#: CRIU's vma status bits (criu/include/image.h)
VMA_AREA_STACK, VMA_AREA_HEAP, VMA_FILE_PRIVATE, VMA_FILE_SHARED = 1 << 1, 1 << 5, 1 << 6, 1 << 7


def _prot(p: int) -> str:
    return ("r" if p & 1 else "-") + ("w" if p & 2 else "-") + ("x" if p & 4 else "-")


def regular_files(images: Path) -> dict[int, str]:
    """files.img's regular files: id (what a file mapping's shmid names) -> container path ("" if unnamed)."""
    if not (images / "files.img").exists():
        return {}
    return {int(e["id"]): str(e["reg"].get("name", "")) for e in _load_img(images / "files.img")["entries"]
            if "reg" in e}


def pages_by_mapping(images: Path) -> list[tuple[str, int]]:
    """Dumped pages per mapping, most first. A restore copies every one of them, so this is where a restore's
    time goes, and what a leaner app configuration would save. File mappings are named by their file (a private
    mapping's pages here are the ones the app wrote to: a JVM's relocated CDS archive), anonymous ones by their
    protection, size and address (a JVM's young and old generation, metaspace and code cache are each one)."""
    files = regular_files(images)
    counts: dict[str, int] = {}
    for e in _load_img(images / "pstree.img")["entries"]:
        pid = e["pid"]
        if not (images / f"mm-{pid}.img").exists() or not (images / f"pagemap-{pid}.img").exists():
            continue
        vmas = []
        for v in _load_img(images / f"mm-{pid}.img")["entries"][0].get("vmas", []):
            start, end, status = _int(v["start"]), _int(v["end"]), _int(v.get("status", 0))
            if status & VMA_AREA_HEAP:
                label = "[heap]"
            elif status & VMA_AREA_STACK:
                label = "[stack]"
            elif status & (VMA_FILE_PRIVATE | VMA_FILE_SHARED):
                label = files.get(_int(v.get("shmid", 0)), "[file]") or "?"
            else:
                label = f"[anon {_prot(_int(v.get('prot', 0)))} {(end - start) / 2**20:.1f} MiB at {start:#x}]"
            vmas.append((start, end, label))
        vmas.sort()
        starts = [s for s, _, _ in vmas]
        for pm in _load_img(images / f"pagemap-{pid}.img")["entries"][1:]:
            addr = _int(pm["vaddr"])
            end = addr + int(pm["nr_pages"]) * 4096
            i = max(0, bisect.bisect_right(starts, addr) - 1)
            while addr < end:  # one pagemap entry may run across neighbouring mappings
                if i >= len(vmas) or addr < vmas[i][0]:
                    nxt = vmas[i][0] if i < len(vmas) else end
                    label, stop = "[unmapped]", min(end, nxt)
                else:
                    label, stop = vmas[i][2], min(end, vmas[i][1])
                    i += 1
                if stop > addr:
                    counts[label] = counts.get(label, 0) + (stop - addr) // 4096
                addr = max(addr, stop)
    return sorted(counts.items(), key=lambda kv: -kv[1])


def contents(images: Path) -> dict[str, Any]:
    """What a dump holds, read back with pycriu: the process tree, listening ports, memory."""
    procs = []
    for e in _load_img(images / "pstree.img")["entries"]:
        core = images / f"core-{e['pid']}.img"
        comm = _load_img(core)["entries"][0]["tc"].get("comm", "?") if core.exists() else "?"
        mm = images / f"mm-{e['pid']}.img"
        vmas = len(_load_img(mm)["entries"][0].get("vmas", [])) if mm.exists() else 0
        procs.append({"pid": e["pid"], "ppid": e["ppid"], "comm": comm, "threads": len(e.get("threads", [])),
                      "vmas": vmas})
    return {
        "processes": procs,
        "listening_ports": list(listening_ports(images)),
        "pages_bytes": pages_bytes(images),
        "pages_by_mapping": pages_by_mapping(images),
        "image_files": len(list(images.glob("*.img"))),
    }


def make_private(directory: Path, idmap: IdMap | None) -> None:
    """0600 in a 0700 directory. In a user namespace, group-readable by the range's root instead (0640 in 0710,
    group = the range): CRIU's restored task opens them from inside it, first as host root (before its id maps
    are written: owner) then as the range's root (group). Only through CRIU's descriptor on the directory: the
    path to it stays root's alone."""
    for f in directory.iterdir():
        if f.is_file() and not f.is_symlink():
            if idmap is not None:
                os.chown(f, 0, idmap.host)
            os.chmod(f, 0o600 if idmap is None else 0o640)
    if idmap is not None:
        os.chown(directory, 0, idmap.host)
        os.chmod(directory, 0o710)



# --- the store ---------------------------------------------------------------------------------------------


class CheckpointStore:
    def __init__(self, state: StateDir) -> None:
        self.root = state.checkpoints
        self.images_root = state.images
        self.logs = state.logs

    def dir(self, service: str) -> Path:
        return self.root / service

    def load(self, service: str) -> Checkpoint | None:
        meta = self.dir(service) / "meta.json"
        try:
            return Checkpoint.from_json(json.loads(meta.read_text()), self.dir(service))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def image_rootfs(self, image_short_id: str) -> Path:
        return self.images_root / image_short_id / "rootfs"

    def prune_images(self) -> list[Path]:
        """Blocking. Delete unpacked images no checkpoint here refers to (current or replaced-but-kept ones, of
        any service, configured or not: a checkpoint kept on disk keeps its image). Half-unpacked `.unpack-*`
        directories are crash leftovers and are cleaned elsewhere; an unpack under way holds its service's
        build, during which this is not called."""
        used = set()
        for meta in self.root.glob("*/meta.json"):
            with contextlib.suppress(OSError, ValueError, KeyError, TypeError):
                used.add(Path(json.loads(meta.read_text())["image_rootfs"]).parent)
        gone = []
        for d in sorted(self.images_root.iterdir()) if self.images_root.is_dir() else []:
            if d.is_dir() and not d.name.startswith(".") and d not in used:
                shutil.rmtree(d, ignore_errors=True)
                gone.append(d)
        return gone

    def install(self, tmp: Path, checkpoint: Checkpoint) -> Checkpoint:
        """Swap a freshly built checkpoint into place.

        The old one is renamed aside, not deleted: running instances may still have its diff/ mounted as a lower
        layer (a rename does not disturb a mount; deleting would). sweep_retired() removes it once unused.
        """
        final = self.dir(checkpoint.service)
        write_private(tmp / "meta.json", json.dumps(checkpoint.to_json() | {"dir": str(final)}, indent=2))
        if final.exists():
            os.rename(final, final.with_name(f".retired-{final.name}-{time.time_ns()}"))
        os.rename(tmp, final)
        loaded = self.load(checkpoint.service)
        assert loaded is not None
        return loaded

    def sweep_retired(self, service: str | None = None) -> list[Path]:
        """Blocking. Delete replaced checkpoints (of one service, or all); call only when no instance uses
        them."""
        # Exactly .retired-SERVICE-NANOSECONDS: a glob on the prefix would take web-api's for web's.
        name = re.compile(rf"\.retired-{re.escape(service) if service else '.+'}-\d+")
        gone = sorted(d for d in self.root.iterdir() if name.fullmatch(d.name)) if self.root.is_dir() else []
        for d in gone:
            shutil.rmtree(d, ignore_errors=True)
        return gone


