"""Issue 30 item 3: CRIU's images are checked before any restore (checkpoints/dumpcheck.py).

A real checkpoint of the busybox demo service is built here; copies of it are then altered with pycriu the way a
crafted archive would alter them (its digests recomputed by the attacker: only the content counts), and every
altered copy must be refused by dumpcheck.check() in one line naming the image. Random byte flips that the check
accepts are restored for real (a bounded number) and must run with no more than the service's sandbox.

Controls: the untouched dump passes the check and restores and serves; the seccomp reference read from runc
(seccompref.py) holds exactly the filter the real dump carries.
"""

from __future__ import annotations

import base64
import json
import os
import random
import shutil
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from activator.checkpoints import dumpcheck, maphazard, seccompstub
from activator.checkpoints.store import Checkpoint
from activator.config.model import load_config
from activator.daemon.server import Activator
from activator.runtime import extmounts, seccompref
from activator.runtime.preflight import require_pycriu
from activator.runtime.spec import capability_set
from tests.conftest import HTTPD, http_get, write_config

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

SERVICE = {"web": HTTPD | {"prepared_slots": 0}}
#: restores of randomly altered dumps the check accepted (each is a real restore: bounded)
MAX_RESTORES = 3
FLIPS_PER_IMAGE = 4


async def _serve(tmp_path: Path) -> tuple[dict[str, str], bytes] | None:
    """Start an activator on tmp_path's state dir (its stored checkpoint is current, so it is used as it is),
    connect once, and return (the instance's /proc status, what it answered), or None if no instance came up."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    services = {"web": SERVICE["web"] | {"listen": f"127.0.0.1:{sock.getsockname()[1]}"}}
    act = Activator(load_config(write_config(tmp_path, services)), sockets=[sock])
    await act.startup()
    try:
        try:
            got = await http_get(sock.getsockname()[1], "/")
        except (OSError, TimeoutError):
            got = b""
        for inst in act.services["web"].instances:
            pid = await inst.sandbox.pid()
            if pid is not None:
                status = Path(f"/proc/{pid}/status").read_text()
                return dict(ln.split(":\t", 1) for ln in status.splitlines() if ":\t" in ln), got
        return None
    finally:
        await act.shutdown()


def _expected(ck: Checkpoint, state: Path) -> dumpcheck.Expected:
    caps = capability_set((), ())
    return dumpcheck.Expected(
        service="web", idmap=ck.idmap, capabilities=frozenset(caps), process=ck.process,
        seccomp=seccompref.reference(ck.seccomp, state), external=extmounts.mounts(),
        **dumpcheck.host_limits(ck.process))


@pytest_asyncio.fixture
async def built(tmp_path: Path) -> tuple[Checkpoint, dumpcheck.Expected]:
    """A real checkpoint of the demo service (built by a real activator), and what this host expects of it."""
    served = await _serve(tmp_path)
    assert served is not None, "the demo service did not serve"
    meta = tmp_path / "state" / "checkpoints" / "web" / "meta.json"
    ck = Checkpoint.from_json(json.loads(meta.read_text()), meta.parent)
    # as an import does: this host's own cgroup tree outside the container (roots of hierarchies runc does not
    # manage, present once a container engine mounted them) is not part of what is checked or restored
    dumpcheck.strip_cgroup_roots(ck.images)
    return ck, _expected(ck, tmp_path / "state")


# --- pycriu edits ---------------------------------------------------------------------------------------------


def _edit(name: str, change: Callable[[dict[str, Any]], None]) -> Callable[[Path], str]:
    def apply(images: Path) -> str:
        pycriu = require_pycriu()
        with open(images / name, "rb") as f:
            doc = pycriu.images.load(f)
        change(doc)
        with open(images / name, "wb") as f:
            pycriu.images.dump(doc, f)
        return name
    return apply


def _first(doc: dict[str, Any]) -> dict[str, Any]:
    e: dict[str, Any] = doc["entries"][0]
    return e


def _creds(doc: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = _first(doc)["thread_core"]["creds"]
    return c


def _named(images: Path, prefix: str) -> str:
    return next(p.name for p in sorted(images.iterdir()) if p.name.startswith(prefix))


ALLOW_ALL = base64.b64encode(bytes.fromhex("0600000000 00ff7f".replace(" ", ""))).decode()


def _mutations(images: Path) -> dict[str, Callable[[Path], str]]:
    mnts, userns, ids = _named(images, "mountpoints-"), _named(images, "userns-"), _named(images, "ids-")
    root_mnt = next(e["mnt_id"] for e in _load(images / mnts)["entries"] if e["mountpoint"] == "/")

    def add_mount(doc: dict[str, Any]) -> None:
        doc["entries"].append({"fstype": 0, "mnt_id": 4242, "root_dev": 2049, "parent_mnt_id": root_mnt,
                               "flags": 0, "root": "/", "mountpoint": "/host", "source": "/dev/sda1",
                               "options": "", "fsname": "ext4"})

    def add_file(name: str, mode: int) -> Callable[[dict[str, Any]], None]:
        def change(doc: dict[str, Any]) -> None:
            doc["entries"].append({"type": "REG", "id": 4242, "reg": {
                "id": 4242, "flags": 2, "pos": 0, "fown": {"uid": 0, "euid": 0, "signum": 0, "pid_type": 0,
                                                           "pid": 0},
                "name": name, "mnt_id": root_mnt, "mode": mode}})
        return change

    def rename_file(name: str) -> Callable[[dict[str, Any]], None]:
        def change(doc: dict[str, Any]) -> None:
            next(e for e in doc["entries"] if e.get("type") == "REG")["reg"]["name"] = name
        return change

    def seccomp_set(doc: dict[str, Any]) -> None:
        doc["entries"][0]["seccomp_filters"][0]["filter"] = ALLOW_ALL

    def seccomp_off(doc: dict[str, Any]) -> None:
        th = _first(doc)["thread_core"]
        th["seccomp_mode"] = "disabled"
        th.pop("seccomp_filter", None)

    return {
        "capability CAP_SYS_ADMIN in cap_eff": _edit("core-1.img", lambda d: _creds(d).update(
            cap_eff=[_creds(d)["cap_eff"][0] | 1 << 21, 0])),
        "capability CAP_SYS_MODULE in cap_bnd": _edit("core-1.img", lambda d: _creds(d).update(
            cap_bnd=[_creds(d)["cap_bnd"][0] | 1 << 16, 0])),
        "ambient capability CAP_NET_ADMIN": _edit("core-1.img", lambda d: _creds(d).update(cap_amb=[1 << 12, 0])),
        "uid outside the namespace's range": _edit("core-1.img", lambda d: _creds(d).update(uid=70000, euid=70000)),
        "no_new_privs cleared": _edit("core-1.img", lambda d: _creds(d).update(no_new_privs=0)),
        "seccomp filter replaced by allow-all": _edit("seccomp.img", seccomp_set),
        "seccomp filter removed from the task": _edit("core-1.img", seccomp_off),
        "seccomp filter list emptied": _edit("seccomp.img", lambda d: d["entries"][0].pop("seccomp_filters")),
        "a mount of the host's disk": _edit(mnts, add_mount),
        "/proc/sys made writable": _edit(mnts, lambda d: next(
            e for e in d["entries"] if e["mountpoint"] == "/proc/sys").update(flags=0x20000e)),
        "an external mount key of the host": _edit(mnts, lambda d: next(
            e for e in d["entries"] if e["mountpoint"] == "/dev").update(ext_key="/etc")),
        "a file path climbing out with ..": _edit("files.img", rename_file("/../../etc/shadow")),
        "a relative file path": _edit("files.img", rename_file("../../etc/shadow")),
        "a block device 8:0 opened": _edit("files.img", add_file("/dev/sda", 0o060660)),
        "a character device outside the allowlist": _edit("files.img", add_file("/dev/mem", 0o020640)),
        "the userns map's lower_first": _edit(userns, lambda d: _first(d)["uid_map"][0].update(lower_first=0)),
        "the userns map's count": _edit(userns, lambda d: _first(d)["gid_map"][0].update(count=1 << 20)),
        "a second userns extent": _edit(userns, lambda d: _first(d)["uid_map"].append(
            {"first": 65536, "lower_first": 0, "count": 1})),
        "a cgroup namespace of its own": _edit(ids, lambda d: _first(d).update(cgroup_ns_id=4242)),
        "the host's pid namespace": _edit(ids, lambda d: _first(d).update(pid_ns_id=1)),
        "a second task with a foreign ppid": _edit("pstree.img", lambda d: d["entries"].append(
            {"pid": 77, "ppid": 4242, "pgid": 1, "sid": 1, "threads": [77]})),
        "a real-time scheduling policy": _edit("core-1.img", lambda d: _first(d)["thread_core"].update(
            sched_policy=1, sched_prio=99)),
        "oom_score_adj -1000": _edit("core-1.img", lambda d: _first(d)["tc"].update(oom_score_adj=-1000)),
        "a CRIU plugin": _edit("inventory.img", lambda d: _first(d).update(plugins_entry={"plugins": ["x"]})),
        "a netns CRIU would build": _edit(_named(images, "netns-"), lambda d: d["entries"].__setitem__(0, {})),
        # 33.4: CRIU places its bootstrap in the first gap of the list as it comes: a VMA listed last that covers
        # the low addresses makes that gap memory the restorer maps over itself
        "a VMA out of order, over the ones before it": _edit(_named(images, "mm-"), lambda d: _first(d)[
            "vmas"].append(_first(d)["vmas"][0] | {"start": 0x10000, "end": _first(d)["vmas"][-2]["end"]})),
    }


def _load(path: Path) -> dict[str, Any]:
    with open(path, "rb") as f:
        doc: dict[str, Any] = require_pycriu().images.load(f)
    return doc


def _store(path: Path, doc: dict[str, Any]) -> None:
    with open(path, "wb") as f:
        require_pycriu().images.dump(doc, f)


def _copy(src: Path, dest: Path) -> Path:
    shutil.copytree(src, dest)
    return dest


def _refused(images: Path, expected: dumpcheck.Expected, name: str) -> str:
    with pytest.raises(dumpcheck.DumpError) as e:
        dumpcheck.check(images, expected)
    line = str(e.value)
    assert "\n" not in line and line.startswith("service 'web': checkpoint refused: ") and name in line, line
    return line


# --- tests ----------------------------------------------------------------------------------------------------


async def test_the_untouched_dump_passes_and_serves(tmp_path: Path,
                                                    built: tuple[Checkpoint, dumpcheck.Expected]) -> None:
    ck, expected = built
    dumpcheck.check(ck.images, expected)  # control: what this host dumped is what it expects
    served = await _serve(tmp_path)  # and it is restored and answers
    assert served is not None
    status, answer = served
    assert answer.startswith(b"HTTP/1.") and b" 200 " in answer.split(b"\r\n")[0], answer[:200]
    assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1"
    assert int(status["CapEff"], 16) == dumpcheck.cap_mask(expected.capabilities)


async def test_the_seccomp_reference_is_the_dumped_filter(tmp_path: Path,
                                                          built: tuple[Checkpoint, dumpcheck.Expected]) -> None:
    ck, expected = built
    dumped = _load(ck.images / "seccomp.img")["entries"][0]["seccomp_filters"]
    assert len(dumped) == 1  # the template runs under runc's one filter
    program = base64.b64decode(dumped[0]["filter"])
    (ref,) = expected.seccomp
    assert ref.flags == 0 and dumped[0].get("flags", 0) & ~seccompref.FLAG_TSYNC == 0
    # the same program up to runc's stub, whose blocks come in random order; the libseccomp body is identical
    assert len(program) == len(ref.program) and dumpcheck.seccomp_matches(program, ref.program)
    n = seccompstub._stub_length(ref.program)
    assert 0 < n < 64 and program[n * 8:] == ref.program[n * 8:]
    # controls: a stub that allows, or a body that differs by one instruction, does not match
    allow = bytes.fromhex("060000000000ff7f")
    assert not dumpcheck.seccomp_matches(allow + ref.program[n * 8:], ref.program)
    flipped = bytearray(program)
    flipped[-16] ^= 1
    assert not dumpcheck.seccomp_matches(bytes(flipped), ref.program)
    # cached: a second call does not run runc (the cache file is what it reads)
    cache = list((tmp_path / "state" / seccompref.CACHE).glob("*.json"))
    assert len(cache) == 1 and cache[0].stat().st_mode & 0o777 == 0o600
    assert cache[0].parent.stat().st_mode & 0o777 == 0o700
    assert seccompref.reference(ck.seccomp, tmp_path / "state") == expected.seccomp
    # unconfined: no reference
    assert seccompref.reference(None, tmp_path / "state") == ()


async def test_crafted_dumps_are_refused_naming_the_image(tmp_path: Path,
                                                          built: tuple[Checkpoint, dumpcheck.Expected]) -> None:
    ck, expected = built
    base = _copy(ck.images, tmp_path / "base")
    dumpcheck.check(base, expected)  # control: the copy passes as it is
    lines = {}
    for i, (what, mutate) in enumerate(_mutations(base).items()):
        images = _copy(base, tmp_path / f"m{i}")
        name = mutate(images)
        lines[what] = _refused(images, expected, name)
    # an image CRIU does not write for us, and a missing one
    images = _copy(base, tmp_path / "extra")
    shutil.copy(images / "inventory.img", images / "creds-1.img")
    _refused(images, expected, "creds-1.img")
    images = _copy(base, tmp_path / "missing")
    (images / "core-1.img").unlink()
    _refused(images, expected, "core-1.img")
    assert "CAP_SYS_ADMIN beyond the service's set" in lines["capability CAP_SYS_ADMIN in cap_eff"]
    assert "seccomp.img: filter 0 of core-1.img" in lines["seccomp filter replaced by allow-all"]


async def test_truncated_lengthened_and_flipped_images(tmp_path: Path,
                                                       built: tuple[Checkpoint, dumpcheck.Expected]) -> None:
    """Every decoded image truncated, lengthened and with random bytes flipped (fixed seed): refused by the check,
    or (a flip it accepts) restored with no more than the service's sandbox, or refused by CRIU."""
    ck, expected = built
    base = _copy(ck.images, tmp_path / "base")
    rng = random.Random(30)
    accepted: list[tuple[str, Path]] = []
    refused = 0
    n = 0
    for f in sorted(base.iterdir()):
        if f.name.startswith("pages-"):  # raw memory: the app's own, not the sandbox's
            continue
        data = f.read_bytes()
        variants = [("truncated", data[: len(data) // 2]), ("lengthened", data + b"\xff" * 7)]
        for _ in range(FLIPS_PER_IMAGE):
            flipped = bytearray(data)
            at = rng.randrange(len(flipped))
            flipped[at] ^= 1 << rng.randrange(8)
            variants.append((f"byte {at} flipped", bytes(flipped)))
        for label, content in variants:
            n += 1
            images = _copy(base, tmp_path / f"v{n}")
            (images / f.name).write_bytes(content)
            try:
                dumpcheck.check(images, expected)
            except dumpcheck.DumpError as e:
                assert "\n" not in str(e) and f.name in str(e), str(e)
                refused += 1
                shutil.rmtree(images)
                continue
            accepted.append((f"{f.name} {label}", images))
    assert refused > n // 2, f"only {refused} of {n} altered dumps refused"
    allowed = dumpcheck.cap_mask(expected.capabilities)
    restores = 0
    for label, images in accepted[:MAX_RESTORES]:
        live = ck.images
        for f in images.iterdir():
            target = live / f.name
            st = target.stat()
            shutil.copyfile(f, target)
            os.chown(target, st.st_uid, st.st_gid)
        served = await _serve(tmp_path)
        restores += 1
        if served is not None:
            status = served[0]
            assert int(status["CapEff"], 16) & ~allowed == 0, label
            assert int(status["CapBnd"], 16) & ~allowed == 0, label
            assert status["Seccomp"] == "2" and status["NoNewPrivs"] == "1", label
        for f in base.iterdir():  # the next variant starts from the real dump again
            shutil.copyfile(f, live / f.name)
    assert restores == min(MAX_RESTORES, len(accepted))


def _split_last_page(images: Path, change: Callable[[dict[str, Any]], None], *, in_file: bool = False) -> str:
    """The dump's last pagemap run loses its last page to an entry of its own, altered by `change`, and (unless
    in_file) the pages file loses that page's bytes: the crafted entry is what CRIU would read past its end."""
    name = _named(images, "pagemap-")
    doc = _load(images / name)
    last = doc["entries"][-1]
    page = dict(last) | {"vaddr": last["vaddr"] + (last["nr_pages"] - 1) * 4096, "nr_pages": 1}
    change(page)
    if last["nr_pages"] > 1:
        last["nr_pages"] -= 1
        doc["entries"].append(page)
    else:
        doc["entries"][-1] = page
    with open(images / name, "wb") as f:
        require_pycriu().images.dump(doc, f)
    if not in_file:
        pages = images / f"pages-{doc['entries'][0]['pages_id']}.img"
        os.truncate(pages, pages.stat().st_size - 4096)
    return name


async def test_pagemap_entries_read_past_the_pages_file_are_refused(
        tmp_path: Path, built: tuple[Checkpoint, dumpcheck.Expected]) -> None:
    """33.1: CRIU reads every pagemap entry's pages from the pages file, whatever its flags, and takes a missing
    flags field for PE_PRESENT and a missing nr_pages for compat_nr_pages: an entry the size check counted as not
    in the file made the copying restore spin on reads of 0 until restore_timeout."""
    ck, expected = built
    base = _copy(ck.images, tmp_path / "base")
    # control: the same split, the page left present and in the file, passes
    control = _copy(base, tmp_path / "control")
    _split_last_page(control, lambda e: None, in_file=True)
    dumpcheck.check(control, expected)

    def without(key: str) -> Callable[[dict[str, Any]], None]:
        return lambda e: e.pop(key) and None

    def compat(e: dict[str, Any]) -> None:
        e["compat_nr_pages"] = e.pop("nr_pages")

    crafted: dict[str, Callable[[dict[str, Any]], None]] = {
        "flags 0": lambda e: e.update(flags=0),
        "lazy, not present": lambda e: e.update(flags=2),
        "no flags field": without("flags"),
        "compat_nr_pages in place of nr_pages": compat,
    }
    for i, (what, change) in enumerate(crafted.items()):
        images = _copy(base, tmp_path / f"p{i}")
        line = _refused(images, expected, _split_last_page(images, change))
        assert "flags" in line, (what, line)


async def test_one_file_mapped_under_many_names_is_scanned_once(
        tmp_path: Path, built: tuple[Checkpoint, dumpcheck.Expected], monkeypatch: pytest.MonkeyPatch) -> None:
    """33.2: an archive's diff layer (or a template app, in its writable layer) holds hard links of one big file,
    and its files.img and mm image map each of them executable: maphazard.find read the whole file once per name
    (MAX_SCAN, 256 MiB, each: 0.75 s for a sparse one), on the import's or build's thread. Now once, and at most
    MAX_TOTAL_SCAN in all."""
    ck, expected = built
    base = _copy(ck.images, tmp_path / "base")
    read, got = os.read, [0]

    def counted(fd: int, n: int) -> bytes:
        block = read(fd, n)
        got[0] += len(block)
        return block
    monkeypatch.setattr(os, "read", counted)
    # control: the real dump is looked through (busybox, mapped executable, is read) and has no hazard
    assert maphazard.find(base, ck.layers) == ""
    busybox = (ck.image_rootfs / "bin" / "busybox").stat().st_size
    assert 0 < got[0] <= busybox + 4096, (got, busybox)

    size, links = 8 * 2**20, 64
    diff = tmp_path / "diff"
    (diff / "lib").mkdir(parents=True)
    (diff / "lib" / "big.so").touch()
    os.truncate(diff / "lib" / "big.so", size)
    for i in range(links):
        os.link(diff / "lib" / "big.so", diff / "lib" / f"l{i}.so")
    files, mm = _load(base / "files.img"), _load(base / _named(base, "mm-"))
    reg = next(e for e in files["entries"] if e.get("type") == "REG")
    vma = next(v for v in mm["entries"][0]["vmas"] if v["prot"] & 4 and v.get("shmid") == reg["id"])
    vmas = mm["entries"][0]["vmas"]
    at = max(i for i, v in enumerate(vmas) if v["end"] < 1 << 46)  # the new ones go in address order after it
    top = vmas[at]["end"]
    for i in range(links):
        fid = 9000 + i
        files["entries"].append({"type": "REG", "id": fid, "reg": reg["reg"] | {"id": fid,
                                                                                "name": f"/lib/l{i}.so"}})
        start = top + (i + 1) * 2 * 4096
        vmas.insert(at + 1 + i, vma | {"start": start, "end": start + 4096, "shmid": fid})
    _store(base / "files.img", files)
    _store(base / _named(base, "mm-"), mm)
    dumpcheck.check(base, expected)  # what an import checks lets it through: the names are clean, the VMAs free
    got[0] = 0
    assert maphazard.find(base, [diff, *ck.layers]) == ""
    assert got[0] <= busybox + size + 2 * 4096, got  # each file once: was links * size (512 MiB here)
