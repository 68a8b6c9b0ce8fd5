"""What in a dumped app makes `restore_memory: map` unsafe for it (docs/restore-memory.md).

A mapped restore gives memory the app had at the checkpoint file semantics: memory it discards with
MADV_DONTNEED reads the checkpoint's bytes again, not zeros. An allocator that takes discarded memory for zeroed
hands those bytes out as calloc'd memory. jemalloc does (it marks an extent zeroed after a forced purge): Redis,
restored by map, crashed in dictFind on a "zeroed" bucket array after FLUSHDB and MEMORY PURGE
(tests/engine/test_restore_memory_apps.py), and memcheck's jemalloc check read 99.86% of its old bytes back.
glibc malloc and HotSpot do not (test_restore_memory.py; HotSpot uncommits with mmap(MAP_FIXED)).

Found from the checkpoint itself, once when it is made: a shared jemalloc by its file name among the files the
dumped processes map; a static one (Redis built from source, as the official image is) by jemalloc's own
message prefix inside an executable file they map, read from the checkpoint's layers. Not found: an allocator
that behaves so under another name; docs/restore-memory.md says to test an app under map before relying
on it.

The layers are an image author's files: only regular files are read, never through a symbolic link (a link out
of the layer would name a host file), at most MAX_SCAN bytes of each, and nothing is learned from them but
whether the prefix is there.
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path

from .store import VMA_FILE_PRIVATE, VMA_FILE_SHARED

#: allocator -> (its shared library's file name, a byte string every static copy carries: its error messages'
#: prefix, compiled into malloc_printf's callers)
ALLOCATORS = {"jemalloc": (re.compile(r"libjemalloc\.so(\.[0-9]+)*"), b"<jemalloc>: ")}
#: the most of one executable read while looking (a JVM's libjvm.so is ~20 MiB)
MAX_SCAN = 256 * 2**20
#: the most read over all of a checkpoint's executables: the names come from the dump (an app can map one file
#: through thousands of hard links, an imported files.img can spell one path thousands of ways), and without a
#: bound a build or import read MAX_SCAN for each; past it the checkpoint is restored by copy
MAX_TOTAL_SCAN = 1024 * 2**20
#: the most of a dumped path a hazard names
MAX_SHOWN = 240
CHUNK = 4 * 2**20
PROT_EXEC = 4


def mapped_files(images: Path) -> dict[str, bool]:
    """Container path of every file the dumped processes map -> whether any mapping of it is executable."""
    from .store import _int, _load_img, regular_files

    names = regular_files(images)
    out: dict[str, bool] = {}
    for p in _load_img(images / "pstree.img")["entries"]:
        mm = images / f"mm-{int(p['pid'])}.img"
        if not mm.exists():
            continue
        for v in _load_img(mm)["entries"][0].get("vmas", []):
            if _int(v.get("status", 0)) & (VMA_FILE_PRIVATE | VMA_FILE_SHARED):
                name = names.get(_int(v.get("shmid", 0)))
                if name:
                    out[name] = out.get(name, False) or bool(_int(v.get("prot", 0)) & PROT_EXEC)
    return out


def find(images: Path, layers: list[Path]) -> str:
    """Blocking. Why mapping this checkpoint's memory would break its app ("jemalloc (PATH)"), or "" if nothing
    known to is there. Raises what pycriu raises on an unreadable image (the caller treats that as a hazard)."""
    files = mapped_files(images)
    for allocator, (library, _) in ALLOCATORS.items():
        for name in sorted(files):
            if library.fullmatch(os.path.basename(name)):
                return f"{allocator} ({_shown(name)})"
    seen: dict[str, set[tuple[int, int]]] = {allocator: set() for allocator in ALLOCATORS}
    budget = [MAX_TOTAL_SCAN]
    for name in sorted(n for n, executable in files.items() if executable):
        for allocator, (_, marker) in ALLOCATORS.items():
            if _contains(_in_layers(name, layers), marker, seen[allocator], budget):
                return f"{allocator}, linked into {_shown(name)}"
            if budget[0] <= 0:
                return (f"its app maps more than {MAX_TOTAL_SCAN >> 20} MiB of executables, more than is looked "
                        "through for an allocator that breaks under map")
    return ""


def _shown(name: str) -> str:
    """A dumped path as a log line and `status` may carry it: the app chose it (a directory named with a newline
    and a line of the operator's log after it), so what is not printable is escaped and the length bounded."""
    if len(name) > MAX_SHOWN:
        name = name[:MAX_SHOWN // 2] + "..." + name[-MAX_SHOWN // 2:]
    return _printable(name)


def _printable(text: str) -> str:
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in text)


def said(hazard: str) -> str:
    """A find() result as the operator reads it: an allocator's name alone does not say what it does wrong under
    map. Anything else (an imported dump that could not be read to look) is not an allocator the app has."""
    hazard = _printable(hazard)  # a record written before find() escaped the path
    if hazard.split(" ", 1)[0].rstrip(",") in ALLOCATORS:
        return (f"its app has {hazard}, which counts on memory it discarded reading back as zeros; mapped memory "
                "reads back the checkpoint's bytes instead")
    return hazard


def restore_maps(mode: str, hazard: str, criu_maps: bool) -> tuple[bool, str]:
    """Is an instance of a checkpoint with this hazard restored by mapping under `restore_memory: mode`, and if
    mapping was asked for but is not done, why (the operator's line); "" when nothing is to be said."""
    if mode not in ("map", "map-always"):
        return False, ""
    if not criu_maps:  # it would refuse the restore config's line and fail every restore
        return False, (f"restore_memory: {mode} is not used: CRIU cannot restore by mapping (it lacks activator's "
                       "scripts/criu-patches/0003; `make setup` builds one that can); its instances are restored by "
                       "copy")
    if mode == "map" and hazard:
        return False, (f"restore_memory: map is not used: {said(hazard)} (docs/restore-memory.md); its instances "
                       "are restored by copy (restore_memory: map-always maps them anyway)")
    return True, ""


def _in_layers(name: str, layers: list[Path]) -> Path | None:
    """The topmost layer's copy of a container path, if it is a regular file reached without a symbolic link."""
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    for layer in layers:
        here = layer
        for i, part in enumerate(parts):
            here = here / part
            try:
                st = os.lstat(here)
            except OSError:
                break
            if stat.S_ISLNK(st.st_mode):
                break
            if i == len(parts) - 1:
                return here if stat.S_ISREG(st.st_mode) else None
            if not stat.S_ISDIR(st.st_mode):
                break
    return None


def _contains(path: Path | None, marker: bytes, files: set[tuple[int, int]], budget: list[int]) -> bool:
    """Whether the file holds marker within MAX_SCAN; a file (device, inode) already in `files` is not read again,
    and every byte read is taken from budget[0]."""
    if path is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return False
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or (st.st_dev, st.st_ino) in files:
            return False
        files.add((st.st_dev, st.st_ino))
        tail, seen = b"", 0
        while seen < MAX_SCAN and budget[0] > 0:
            block = os.read(fd, min(CHUNK, budget[0]))
            if not block:
                return False
            if marker in tail + block:
                return True
            tail, seen = block[-len(marker):], seen + len(block)
            budget[0] -= len(block)
        return False
    finally:
        os.close(fd)
