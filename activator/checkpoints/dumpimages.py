"""Which image files CRIU writes for a container of ours, and reading them: each decoded (pycriu) within bounds, or
refused; and the dumping host's own cgroup roots stripped from an import's cgroup.img. Blocking."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

from .dumpexpected import MAX_FILES, MAX_IMAGE, Expected, Refuse
from .dumpfiles import DESCRIPTORS, S_IFMT

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
#: CRIU's own logs and statistics in the image directory, never read on restore
IGNORED = re.compile(r"(dump|restore)\.log|stats-(dump|restore)")
#: payload images pycriu reads with their data (decoded with no_payload: the data is not looked at)
PAYLOAD = {"PIPES_DATA", "FIFO_DATA", "SK_QUEUES", "TCP_STREAM", "GHOST_FILE", "IPCNS_SHM", "IPCNS_MSG",
           "IPCNS_SEM"}


def load_docs(images: Path, expected: Expected) -> dict[str, Any]:
    """Blocking. Every image file in the directory, decoded (name -> pycriu's dict; raw files -> None;
    descriptors.json -> its list). Refuses unknown names, oversized or undecodable files, and a wrong magic."""
    import json

    from activator.runtime.preflight import require_pycriu

    refuse = Refuse(expected)
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
        if not magic:  # raw: its size is all check_pages needs of it
            docs[name] = {"size": st.st_size} if kind[1] == "pages" else None
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


#: pagemap entry flags (criu/include/pagemap.h): in the parent images, lazy, in this image's pages file
PE_PARENT, PE_LAZY, PE_PRESENT = 1 << 0, 1 << 1, 1 << 2
PAGE = 4096


def check_pages(docs: dict[str, Any], refuse: Refuse) -> None:
    """Pure. Every pagemap names a pages file of this dump and, with the others naming it, accounts for it to the
    byte. A pages file shorter than its pagemaps says made CRIU's copying restore loop forever on a read of 0 (up
    to restore_timeout), and a mapped restore (restore_memory: map) refuses it only at restore; a longer one is
    memory no pagemap places. Parent images (a pre-dump's) are not something a checkpoint of ours has."""
    present: dict[int, int] = {}
    for name in sorted(n for n in docs if n.startswith("pagemap-")):
        entries = docs[name].get("entries", [])
        if not entries or not isinstance(entries[0], dict) or "pages_id" not in entries[0]:
            raise refuse(name, "pages_id", "missing")
        pages_id = int(entries[0]["pages_id"])
        if f"pages-{pages_id}.img" not in docs:
            raise refuse(name, "pages_id", f"names pages-{pages_id}.img, which the dump does not have")
        total = present.get(pages_id, 0)
        for e in entries[1:]:
            # CRIU's restore reads every entry's pages from the pages file at the running offset, whatever its
            # flags say (restore_priv_vma_content), and takes a missing flags field for PE_PRESENT and a
            # missing nr_pages for compat_nr_pages (init_compat_pagemap_entry): an entry counted here as not in
            # the file would be read past its end. So every entry is one CRIU writes for a full dump: both
            # fields there, PE_PRESENT (PE_LAZY beside it marks anonymous memory), page-aligned.
            if "flags" not in e or "nr_pages" not in e or e.get("in_parent"):
                raise refuse(name, "flags", "an entry without flags or nr_pages, or in parent images")
            flags, nr, vaddr = int(e["flags"]), int(e["nr_pages"]), int(e.get("vaddr", 0))
            if flags & PE_PARENT:
                raise refuse(name, "flags", "pages in parent images (a pre-dump's)")
            if flags & ~(PE_PRESENT | PE_LAZY) or not flags & PE_PRESENT:
                raise refuse(name, "flags", f"{flags:#x} (pages CRIU would read from the file yet not in it)")
            if nr < 0:
                raise refuse(name, "nr_pages", str(nr))
            if vaddr % PAGE:
                raise refuse(name, "vaddr", f"{vaddr:#x} (not page-aligned)")
            total += nr
        present[pages_id] = total
    for name, doc in docs.items():
        m = re.fullmatch(r"pages-(\d+)\.img", name)
        if m is None:
            continue
        want = present.get(int(m.group(1)))
        if want is None:
            raise refuse(name, "file", "no pagemap names it")
        if doc["size"] != want * PAGE:
            raise refuse(name, "size", f"{doc['size']} bytes where its pagemaps place {want} pages "
                                       f"({want * PAGE} bytes)")


def check_vmas(docs: dict[str, Any], refuse: Refuse) -> None:
    """Pure. Each mm image's VMAs page-aligned, non-empty, in address order and apart, as the kernel reports
    them. CRIU's restore takes the list as it comes: it places its restorer and bootstrap in the first gap
    between consecutive entries (restorer_get_vma_hint), so an entry out of order or overlapping another hides
    memory a later one maps, and the restorer would then map that memory (MAP_FIXED, with the image's bytes under
    restore_memory: map) over its own code and arguments while it runs, before seccomp and the capability
    bounding set are restored; a run is kept within one VMA (patch 0003), which is no bound if VMAs overlap."""
    for name in sorted(n for n in docs if re.fullmatch(r"mm-\d+\.img", n)):
        entries = docs[name].get("entries", []) if isinstance(docs[name], dict) else []
        vmas = entries[0].get("vmas", []) if entries and isinstance(entries[0], dict) else []
        end = 0
        for i, v in enumerate(vmas):
            start, stop = int(v.get("start", 0)), int(v.get("end", 0))
            if start % PAGE or stop % PAGE or stop <= start:
                raise refuse(name, f"vma {i}", f"{start:#x}-{stop:#x} (not page-aligned or empty)")
            if start < end:
                raise refuse(name, f"vma {i}", f"{start:#x}-{stop:#x} out of order or overlapping the one before "
                                               f"(which ends at {end:#x})")
            end = stop


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
