"""dumpcheck.check_docs on small hand-made decoded dumps (the shape pycriu gives): each field refused alone, with
the untouched dump accepted as the control. The real-dump counterpart is tests/engine/test_dump_validation.py."""

from __future__ import annotations

import base64
import copy
import re
from collections.abc import Callable
from typing import Any

import pytest

from activator.checkpoints import dumpcheck
from activator.runtime.seccompref import FLAG_TSYNC, Filter
from activator.runtime.spec import DEFAULT_CAPS, ProcessSpec
from activator.runtime.userns import IdMap

# a stub as runc makes one (ld arch; jeq; ja; ret ENOSYS) and a body
BODY = bytes.fromhex("2000000004000000" "060000000000ff7f")
STUB = bytes.fromhex("2000000004000000" "150001003e0000c0" "0500000000000000" "0600000026000500")
REF = Filter(STUB + BODY)
IDMAP = IdMap(1 << 30)
CAPS = frozenset(DEFAULT_CAPS)
EXT = {"dev": "/dev", "shm": "/dev/shm", "mask0": "/proc/acpi"}


def expected(**kw: Any) -> dumpcheck.Expected:
    base: dict[str, Any] = {
        "service": "web", "idmap": IDMAP, "capabilities": CAPS, "process": ProcessSpec(("x",), (), "/", 0, 0),
        "seccomp": (REF,), "external": EXT, "rlimits": tuple([1 << 20] * 16)}
    return dumpcheck.Expected(**(base | kw))


def creds(**kw: Any) -> dict[str, Any]:
    mask = dumpcheck.cap_mask(CAPS)
    return {"uid": 0, "gid": 0, "euid": 0, "egid": 0, "suid": 0, "sgid": 0, "fsuid": 0, "fsgid": 0,
            "cap_inh": [0, 0], "cap_prm": [mask, 0], "cap_eff": [mask, 0], "cap_bnd": [mask, 0], "secbits": 0,
            "no_new_privs": 1, "cap_amb": [0, 0]} | kw


def mount(mid: int, parent: int, fstype: int, point: str, flags: int, **kw: Any) -> dict[str, Any]:
    return {"fstype": fstype, "mnt_id": mid, "root_dev": 1, "parent_mnt_id": parent, "flags": flags, "root": "/",
            "mountpoint": point, "source": "x", "options": "", "shared_id": 0, "master_id": 0} | kw


def dump() -> dict[str, Any]:
    ids = {"vm_id": 2, "files_id": 2, "fs_id": 2, "sighand_id": 2, "pid_ns_id": 9, "net_ns_id": 10,
           "ipc_ns_id": 11, "uts_ns_id": 12, "mnt_ns_id": 13, "user_ns_id": 14, "cgroup_ns_id": 8, "time_ns_id": 5}
    root_ids = ids | {"pid_ns_id": 1, "net_ns_id": 2, "ipc_ns_id": 3, "uts_ns_id": 4, "mnt_ns_id": 6,
                      "user_ns_id": 7}
    reg = {"id": 1, "flags": 0, "pos": 0, "fown": {}, "name": "/bin/busybox", "mnt_id": 84, "mode": 0o100755}
    return {
        "inventory.img": {"magic": "INVENTORY", "entries": [{"img_version": 2, "root_ids": root_ids,
                                                             "lsmtype": "NO_LSM", "plugins_entry": {}}]},
        "pstree.img": {"magic": "PSTREE", "entries": [{"pid": 1, "ppid": 0, "pgid": 1, "sid": 1, "threads": [1]}]},
        "ids-1.img": {"magic": "IDS", "entries": [ids]},
        "mm-1.img": {"magic": "MM", "entries": [{}]},
        "fs-1.img": {"magic": "FS", "entries": [{"cwd_id": 1, "root_id": 1}]},
        "core-1.img": {"magic": "CORE", "entries": [{
            "mtype": "X86_64", "tc": {"loginuid": 0xFFFFFFFF, "oom_score_adj": 0, "rlimits": {"rlimits": [
                {"cur": 1024, "max": 4096}]}},
            "thread_core": {"creds": creds(), "seccomp_mode": "filter", "seccomp_filter": 0}}]},
        "seccomp.img": {"magic": "SECCOMP", "entries": [{"seccomp_filters": [
            {"filter": base64.b64encode(REF.program).decode(), "flags": 1}]}]},
        "files.img": {"magic": "FILES", "entries": [{"type": "REG", "id": 1, "reg": reg}]},
        "fdinfo-2.img": {"magic": "FDINFO", "entries": [{"id": 1, "flags": 0, "type": "REG", "fd": 0}]},
        "mountpoints-13.img": {"magic": "MNTS", "entries": [
            mount(84, 55, 17, "/", 0x200000),
            mount(85, 84, 1, "/proc", 0x20000e),
            mount(86, 84, 5, "/dev", 0x1000002, ext_key="dev"),
            mount(59, 85, 1, "/proc/sys", 0x20000f, root="/sys"),
            mount(60, 85, 5, "/proc/acpi", 0x200001, ext_key="mask0"),
            mount(91, 86, 3, "/dev/null", 0x200000, root="/null", ext_key="/dev/null")]},
        "netns-10.img": {"magic": "NETNS", "entries": [{"ext_key": "extRootNetNS"}]},
        "userns-14.img": {"magic": "USERNS", "entries": [{
            "uid_map": [{"first": 0, "lower_first": IDMAP.host, "count": IDMAP.size}],
            "gid_map": [{"first": 0, "lower_first": IDMAP.host, "count": IDMAP.size}]}]},
        "utsns-12.img": {"magic": "UTSNS", "entries": [{"nodename": "web", "domainname": "(none)"}]},
        "descriptors.json": ["/dev/null", "pipe:[1]", "pipe:[1]"],
        "pagemap-1.img": {"magic": "PAGEMAP", "entries": [
            {"pages_id": 1}, {"vaddr": 0x400000, "nr_pages": 2, "flags": 4},
            {"vaddr": 0x600000, "nr_pages": 1, "flags": 6}]},
        "pages-1.img": {"size": 3 * 4096},
    }


def core(d: dict[str, Any]) -> dict[str, Any]:
    c: dict[str, Any] = d["core-1.img"]["entries"][0]
    return c


def mounts(d: dict[str, Any]) -> list[dict[str, Any]]:
    m: list[dict[str, Any]] = d["mountpoints-13.img"]["entries"]
    return m


def test_the_hand_made_dump_is_accepted() -> None:
    dumpcheck.check_docs(dump(), expected())
    # and with an app that narrowed its sandbox: capabilities dropped, a filter stacked, another id of the range
    d = dump()
    core(d)["thread_core"]["creds"] = creds(cap_eff=[0, 0], uid=1000, euid=1000, suid=1000, fsuid=1000)
    d["seccomp.img"]["entries"][0]["seccomp_filters"][0]["prev"] = 1
    d["seccomp.img"]["entries"][0]["seccomp_filters"].append({"filter": base64.b64encode(BODY).decode()})
    dumpcheck.check_docs(d, expected())


CASES: dict[str, tuple[str, Callable[[dict[str, Any]], None]]] = {
    "cap_eff": ("core-1.img: creds.cap_eff", lambda d: core(d)["thread_core"]["creds"].update(
        cap_eff=[1 << 21, 0])),
    "cap_bnd": ("core-1.img: creds.cap_bnd", lambda d: core(d)["thread_core"]["creds"].update(
        cap_bnd=[1 << 16, 0])),
    "cap_amb": ("core-1.img: creds.cap_amb", lambda d: core(d)["thread_core"]["creds"].update(cap_amb=[0, 1])),
    "uid out of range": ("core-1.img: creds.uid", lambda d: core(d)["thread_core"]["creds"].update(uid=65536)),
    "no_new_privs": ("core-1.img: creds.no_new_privs",
                     lambda d: core(d)["thread_core"]["creds"].update(no_new_privs=0)),
    "secbits": ("core-1.img: creds.secbits", lambda d: core(d)["thread_core"]["creds"].update(secbits=1 << 12)),
    "lsm": ("core-1.img: creds.lsm_profile",
            lambda d: core(d)["thread_core"]["creds"].update(lsm_profile="unconfined_t")),
    "no seccomp": ("core-1.img: thread_core.seccomp_mode",
                   lambda d: core(d)["thread_core"].update(seccomp_mode="disabled")),
    "strict seccomp": ("core-1.img: thread_core.seccomp_mode",
                       lambda d: core(d)["thread_core"].update(seccomp_mode=1)),
    "other filter": ("seccomp.img: filter 0", lambda d: d["seccomp.img"]["entries"][0]["seccomp_filters"][0].update(
        filter=base64.b64encode(bytes.fromhex("060000000000ff7f")).decode())),
    "filter loop": ("seccomp.img: filter 0", lambda d: d["seccomp.img"]["entries"][0]["seccomp_filters"][0].update(
        prev=0)),
    "old seccomp": ("core-1.img: tc.old_seccomp_mode", lambda d: core(d)["tc"].update(old_seccomp_mode=0)),
    "rlimit": ("core-1.img: tc.rlimits[0]", lambda d: core(d)["tc"]["rlimits"]["rlimits"][0].update(
        max=1 << 40)),
    "oom": ("core-1.img: tc.oom_score_adj", lambda d: core(d)["tc"].update(oom_score_adj=-1000)),
    "loginuid": ("core-1.img: tc.loginuid", lambda d: core(d)["tc"].update(loginuid=1000)),
    "sched": ("core-1.img: sched_policy", lambda d: core(d)["thread_core"].update(sched_policy=1)),
    "host mount": ("mountpoints-13.img: mount '/host'", lambda d: mounts(d).append(
        mount(99, 84, 0, "/host", 0, source="/dev/sda1"))),
    "writable /proc/sys": ("mountpoints-13.img: mount '/proc/sys' flags",
                           lambda d: mounts(d)[3].update(flags=0x20000e)),
    "ext key": ("mountpoints-13.img: mount '/dev'", lambda d: mounts(d)[2].update(ext_key="/etc")),
    "shared mount": ("mountpoints-13.img: mount '/proc'", lambda d: mounts(d)[1].update(master_id=3)),
    "mount loop": ("mountpoints-13.img", lambda d: mounts(d)[1].update(parent_mnt_id=59)),
    "dotdot path": ("files.img: file id 1 (REG) name", lambda d: d["files.img"]["entries"][0]["reg"].update(
        name="/../../etc/shadow")),
    "relative path": ("files.img: file id 1 (REG) name", lambda d: d["files.img"]["entries"][0]["reg"].update(
        name="etc/shadow")),
    "foreign mnt_id": ("files.img: file id 1 (REG) mnt_id", lambda d: d["files.img"]["entries"][0]["reg"].update(
        mnt_id=1)),
    "block device": ("files.img: file id 1 (REG) '/dev/sda'", lambda d: d["files.img"]["entries"][0]["reg"].update(
        name="/dev/sda", mode=0o060660)),
    "char device": ("files.img: file id 1 (REG) '/dev/mem'", lambda d: d["files.img"]["entries"][0]["reg"].update(
        name="/dev/mem", mode=0o020640)),
    "ns fd": ("files.img: file id 1 (NS)", lambda d: d["files.img"]["entries"][0].update(type="NS")),
    "lower_first": ("userns-14.img: uid_map", lambda d: d["userns-14.img"]["entries"][0]["uid_map"][0].update(
        lower_first=0)),
    "count": ("userns-14.img: gid_map", lambda d: d["userns-14.img"]["entries"][0]["gid_map"][0].update(
        count=1 << 20)),
    "host pid ns": ("ids-1.img: pid_ns_id", lambda d: d["ids-1.img"]["entries"][0].update(pid_ns_id=1)),
    "own cgroup ns": ("ids-1.img: cgroup_ns_id", lambda d: d["ids-1.img"]["entries"][0].update(cgroup_ns_id=77)),
    "netns built": ("netns-10.img: ext_key", lambda d: d["netns-10.img"]["entries"].__setitem__(0, {})),
    "foreign ppid": ("pstree.img: ppid of 7", lambda d: d["pstree.img"]["entries"].append(
        {"pid": 7, "ppid": 99, "pgid": 1, "sid": 1, "threads": [7]})),
    "unknown image": ("creds-1.img: file", lambda d: d.__setitem__("creds-1.img", {"magic": "CREDS", "entries": []})),
    "image of no ns": ("utsns-99.img: file", lambda d: d.__setitem__("utsns-99.img", d["utsns-12.img"])),
    "missing core": ("core-1.img: file: missing", lambda d: d.pop("core-1.img")),
    "plugin": ("inventory.img: plugins_entry", lambda d: d["inventory.img"]["entries"][0].update(
        plugins_entry={"plugins": ["amdgpu"]})),
    "stdio": ("descriptors.json", lambda d: d.__setitem__("descriptors.json", ["/etc/shadow"])),
    "malformed": ("core-1.img: structure", lambda d: core(d)["thread_core"]["creds"].update(uid="x")),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_each_field_is_refused_in_one_line_naming_the_image(case: str) -> None:
    where, change = CASES[case]
    d = copy.deepcopy(dump())
    change(d)
    with pytest.raises(dumpcheck.DumpError) as e:
        dumpcheck.check_docs(d, expected())
    line = str(e.value)
    assert "\n" not in line and line.startswith("service 'web': checkpoint refused: ") and where in line, line


def test_a_non_root_app_keeps_its_ids() -> None:
    app = ProcessSpec(("x",), (), "/", 1000, 1000, (1000, 27))
    d = dump()
    core(d)["thread_core"]["creds"] = creds(**{k: 1000 for k in ("uid", "gid", "euid", "egid", "suid", "sgid",
                                                                "fsuid", "fsgid")}, groups=[27])
    dumpcheck.check_docs(d, expected(process=app))  # control
    core(d)["thread_core"]["creds"]["euid"] = 0
    with pytest.raises(dumpcheck.DumpError, match=r"creds\.euid: 0 \(the app runs as 1000"):
        dumpcheck.check_docs(d, expected(process=app))


def test_userns_host_has_no_userns_image_and_shares_the_user_namespace() -> None:
    d = dump()
    d.pop("userns-14.img")
    d["ids-1.img"]["entries"][0]["user_ns_id"] = 7
    dumpcheck.check_docs(d, expected(idmap=None))  # control
    d["userns-7.img"] = {"magic": "USERNS", "entries": [{}]}
    with pytest.raises(dumpcheck.DumpError, match=r"userns-7\.img"):
        dumpcheck.check_docs(d, expected(idmap=None))


def test_unconfined_allows_no_filter_and_a_stub_may_not_allow() -> None:
    d = dump()
    core(d)["thread_core"].update(seccomp_mode="disabled")
    d.pop("seccomp.img")
    dumpcheck.check_docs(d, expected(seccomp=()))
    # runc's stub in another order matches; a stub that returns anything but ENOSYS, or jumps into the body, not
    other_order = bytes.fromhex("2000000004000000" "1500010003000040" "0500000000000000" "0600000026000500")
    assert dumpcheck.seccomp_matches(other_order + BODY, REF.program)
    assert not dumpcheck.seccomp_matches(bytes.fromhex("060000000000ff7f") + BODY, REF.program)
    assert not dumpcheck.seccomp_matches(bytes.fromhex("0500000001000000") + BODY, REF.program)
    assert not dumpcheck.seccomp_matches(other_order + BODY[:-1] + b"\x00", REF.program)


def _threaded(leader_flags: int) -> dict[str, Any]:
    """A two-thread task as CRIU dumps one whose threads share the leader's chain (criu/seccomp.c
    try_use_tsync): the leader's filters flagged TSYNC, the other thread's core with seccomp "disabled"."""
    d = dump()
    d["pstree.img"]["entries"][0]["threads"] = [1, 2]
    d["seccomp.img"]["entries"][0]["seccomp_filters"][0]["flags"] = leader_flags
    other = copy.deepcopy(d["core-1.img"])
    other["entries"][0].pop("tc")
    th = other["entries"][0]["thread_core"]
    th.pop("seccomp_filter")
    th["seccomp_mode"] = "disabled"
    d["core-2.img"] = other
    return d


def test_threads_dumped_without_a_filter_pass_only_when_the_leaders_chain_is_synced() -> None:
    """Redis and Tomcat are dumped so (every multi-threaded app under runc's filter): the leader's TSYNC chain is
    restored into every thread at once. Without TSYNC on the leader, such a thread would run unfiltered."""
    dumpcheck.check_docs(_threaded(FLAG_TSYNC), expected())
    with pytest.raises(dumpcheck.DumpError, match=r"core-2\.img: thread_core\.seccomp_mode"):
        dumpcheck.check_docs(_threaded(0), expected())


def test_hierarchy_roots_are_refused_unless_stripped_and_a_root_path_passes() -> None:
    """A v1 hierarchy runc did not manage (hugetlb after Docker mounted it in a container) is dumped at "/" with
    the host's own tree below it: the path passes, the tree is removed before the check (strip_cgroup_roots), and
    one left in an imported image is refused."""
    d = dump()
    d["cgroup.img"] = {"magic": "CGROUP", "entries": [{
        "sets": [{"id": 1, "ctls": [{"path": "/"}, {"path": "/activator/web-tpl-1"}]}],
        "controllers": [{"cnames": ["hugetlb"], "dirs": [{"dir_name": "", "children": [{"dir_name": "docker"}]}]},
                        {"cnames": ["pids"], "dirs": [{"dir_name": "activator/web-tpl-1"}]}]}]}
    with pytest.raises(dumpcheck.DumpError, match=r"cgroup\.img: controllers \['hugetlb'\]"):
        dumpcheck.check_docs(d, expected())
    dumpcheck.check_docs(d, expected(roots_stripped=False))  # a local dump: this host's own tree
    d["cgroup.img"]["entries"][0]["controllers"][0]["dirs"] = []
    dumpcheck.check_docs(d, expected())  # stripped, as an import is
    d["cgroup.img"]["entries"][0]["sets"][0]["ctls"][0]["path"] = "/../x"
    with pytest.raises(dumpcheck.DumpError, match=r"sets\.ctls\.path"):
        dumpcheck.check_docs(d, expected())


@pytest.mark.parametrize("path", ["/system.slice/activator.service/instances/web-tpl-1",
                                  "/activator.service/instances/web-tpl-1", "activator/web-tpl-1"])
def test_a_template_dumped_under_a_systemd_unit_passes(path: str) -> None:
    """A daemon run as a unit puts its templates below the unit's cgroup (v1 and v2): their dumps are genuine."""
    d = dump()
    d["cgroup.img"] = {"magic": "CGROUP", "entries": [{
        "sets": [{"id": 1, "ctls": [{"path": path}]}],
        "controllers": [{"cnames": ["pids"], "dirs": [{"dir_name": path.lstrip("/")}]}]}]}
    dumpcheck.check_docs(d, expected())


@pytest.mark.parametrize("path", ["/system.slice/activator.service/web-tpl-1", "/../activator/x", "/activator/..",
                                  "/x/../y.service/instances/z", "/activator/web/child", "/docker/abc",
                                  "/system.slice/.service/instances/x"])
def test_a_cgroup_path_outside_ours_is_refused(path: str) -> None:
    d = dump()
    d["cgroup.img"] = {"magic": "CGROUP", "entries": [{"sets": [{"id": 1, "ctls": [{"path": path}]}],
                                                       "controllers": []}]}
    with pytest.raises(dumpcheck.DumpError, match=r"sets\.ctls\.path"):
        dumpcheck.check_docs(d, expected())


@pytest.mark.parametrize("size, why", [
    (3 * 4096 - 1, "12287 bytes where its pagemaps place 3 pages"),  # short: CRIU's copy loop would spin on 0
    (2 * 4096, "8192 bytes where its pagemaps place 3 pages"),
    (4 * 4096, "16384 bytes where its pagemaps place 3 pages"),  # memory no pagemap places
])
def test_a_pages_file_that_its_pagemap_does_not_account_for_to_the_byte_is_refused(size: int, why: str) -> None:
    d = dump()
    d["pages-1.img"] = {"size": size}
    with pytest.raises(dumpcheck.DumpError, match=re.escape(f"pages-1.img: size: {why}")):
        dumpcheck.check_docs(d, expected())


def test_a_pagemap_naming_parent_images_or_a_missing_pages_file_is_refused() -> None:
    d = dump()
    d["pagemap-1.img"]["entries"][1]["flags"] = 1 | 4
    with pytest.raises(dumpcheck.DumpError, match=r"pagemap-1\.img: flags: pages in parent images"):
        dumpcheck.check_docs(d, expected())
    d = dump()
    d["pagemap-1.img"]["entries"][0]["pages_id"] = 7
    with pytest.raises(dumpcheck.DumpError, match=r"pagemap-1\.img: pages_id: names pages-7\.img"):
        dumpcheck.check_docs(d, expected())
    d = dump()
    d["pages-2.img"] = {"size": 0}
    with pytest.raises(dumpcheck.DumpError, match=r"pages-2\.img: file: no pagemap names it"):
        dumpcheck.check_docs(d, expected())


@pytest.mark.parametrize("entry, why", [
    # CRIU's restore reads these pages from the file at the running offset whatever the flags say: counted as
    # absent here, they would be read past the file's end (the copy loop spins on reads of 0)
    ({"vaddr": 0x600000, "nr_pages": 1, "flags": 0}, "flags: 0x0"),
    ({"vaddr": 0x600000, "nr_pages": 1, "flags": 2}, "flags: 0x2"),  # lazy, not transferred
    ({"vaddr": 0x600000, "nr_pages": 1, "flags": 4 | 8}, "flags: 0xc"),
    # no flags field is PE_PRESENT to CRIU, no nr_pages is compat_nr_pages
    ({"vaddr": 0x600000, "nr_pages": 1}, "flags: an entry without flags"),
    ({"vaddr": 0x600000, "compat_nr_pages": 1, "flags": 4}, "flags: an entry without flags or nr_pages"),
    ({"vaddr": 0x600000, "nr_pages": 1, "flags": 4, "in_parent": True},
     "flags: an entry without flags or nr_pages, or in parent images"),
    ({"vaddr": 0x600001, "nr_pages": 1, "flags": 4}, "vaddr: 0x600001 (not page-aligned)"),
])
def test_a_pagemap_entry_crius_restore_reads_differently_from_the_size_check_is_refused(
        entry: dict[str, Any], why: str) -> None:
    d = dump()
    d["pagemap-1.img"]["entries"][2] = entry
    d["pages-1.img"] = {"size": 2 * 4096}  # what the check would count if it took the entry for a hole
    with pytest.raises(dumpcheck.DumpError, match=re.escape(f"pagemap-1.img: {why}")):
        dumpcheck.check_docs(d, expected())
    # control: the same entry as CRIU writes it, with the page in the file, passes
    d["pagemap-1.img"]["entries"][2] = {"vaddr": 0x600000, "nr_pages": 1, "flags": 6}
    d["pages-1.img"] = {"size": 3 * 4096}
    dumpcheck.check_docs(d, expected())


VMAS = [{"start": 0x400000, "end": 0x401000}, {"start": 0x401000, "end": 0x600000},
        {"start": 0x7FFF0000, "end": 0x80000000}, {"start": 0xFFFFFFFFFF600000, "end": 0xFFFFFFFFFF601000}]


@pytest.mark.parametrize("vmas, why", [
    # an enclosing VMA after the ones it covers: CRIU's bootstrap goes in a "gap" that it maps over
    ([*VMAS[:2], {"start": 0x1000, "end": 0x7FFF0000}, *VMAS[2:]], "vma 2: 0x1000-0x7fff0000 out of order"),
    ([VMAS[0], {"start": 0x400000, "end": 0x600000}, *VMAS[2:]], "vma 1: 0x400000-0x600000 out of order"),
    ([VMAS[1], VMAS[0], *VMAS[2:]], "vma 1: 0x400000-0x401000 out of order"),
    ([{"start": 0x400000, "end": 0x400800}, *VMAS[1:]], "vma 0: 0x400000-0x400800 (not page-aligned or empty)"),
    ([{"start": 0x400000, "end": 0x400000}, *VMAS[1:]], "vma 0: 0x400000-0x400000 (not page-aligned or empty)"),
])
def test_mm_vmas_out_of_order_overlapping_or_unaligned_are_refused(vmas: list[dict[str, int]], why: str) -> None:
    d = dump()
    d["mm-1.img"] = {"magic": "MM", "entries": [{"vmas": vmas}]}
    with pytest.raises(dumpcheck.DumpError, match=re.escape(f"mm-1.img: {why}")):
        dumpcheck.check_docs(d, expected())
    # control: the kernel's order, vsyscall's page last, passes
    d["mm-1.img"] = {"magic": "MM", "entries": [{"vmas": VMAS}]}
    dumpcheck.check_docs(d, expected())
