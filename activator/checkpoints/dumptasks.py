"""A dump's tasks and where they live (pure): the inventory, the process tree, one set of namespaces as a slot makes
them (the user namespace's id map, the slot's network namespace joined), an image only for the dump's own tasks
and namespaces, and cgroups only below activator's."""

from __future__ import annotations

import re
from typing import Any

from .dumpexpected import MAX_TASKS, MAX_THREADS, Expected, Refuse, as_int, entries_of, one_of
from .dumpimages import kind_of

#: devices.list lines runc writes for a container of ours (cgroup v1): nothing else may be allowed
DEVICE_RULES = {"b *:* m", "c *:* m", "c 1:3 rwm", "c 1:5 rwm", "c 1:7 rwm", "c 1:8 rwm", "c 1:9 rwm", "c 5:0 rwm",
                "c 5:1 rwm", "c 5:2 rwm", "c 10:200 rwm", "c 136:* rwm"}
NS_KINDS = ("pid_ns_id", "net_ns_id", "ipc_ns_id", "uts_ns_id", "mnt_ns_id", "user_ns_id", "cgroup_ns_id",
            "time_ns_id")


def check_inventory(inv: dict[str, Any], refuse: Refuse) -> None:
    if as_int(inv.get("img_version", 0)) != 2:
        raise refuse("inventory.img", "img_version", f"{inv.get('img_version')} (expected 2)")
    if inv.get("lsmtype", "NO_LSM") not in ("NO_LSM", 0):
        raise refuse("inventory.img", "lsmtype", f"{inv.get('lsmtype')} (this host dumps without an LSM)")
    plugins = inv.get("plugins_entry") or {}
    if plugins.get("plugins"):
        raise refuse("inventory.img", "plugins_entry", f"CRIU plugins {plugins['plugins']} (none are used here)")
    if inv.get("allow_uprobes"):
        raise refuse("inventory.img", "allow_uprobes", "set (never here)")


def check_pstree(docs: dict[str, Any], refuse: Refuse) -> list[tuple[int, list[int]]]:
    entries = entries_of(docs, "pstree.img", refuse)
    if not 1 <= len(entries) <= MAX_TASKS:
        raise refuse("pstree.img", "entries", f"{len(entries)} tasks (1 to {MAX_TASKS})")
    pids: set[int] = set()
    tids: set[int] = set()
    out = []
    for i, e in enumerate(entries):
        pid, ppid = as_int(e["pid"]), as_int(e["ppid"])
        threads = [as_int(t) for t in e.get("threads", [])]
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
            if as_int(e[k]) not in pids:
                raise refuse("pstree.img", f"{k} of {e['pid']}", f"{e[k]}: not a task of the dump")
    return out


def check_namespaces(docs: dict[str, Any], tasks: list[tuple[int, list[int]]], root_ids: dict[str, Any],
                expected: Expected, refuse: Refuse) -> dict[str, int]:
    """Every task in the one set of namespaces a slot makes: its own pid, net, ipc, uts, mnt (and user, unless
    `userns: host`) namespaces; the host's cgroup and time namespaces."""
    own = {"pid_ns_id", "net_ns_id", "ipc_ns_id", "uts_ns_id", "mnt_ns_id"} | (
        {"user_ns_id"} if expected.idmap is not None else set())
    first: dict[str, int] | None = None
    for pid, _ in tasks:
        name = f"ids-{pid}.img"
        ids = one_of(docs, name, refuse)
        got = {k: as_int(ids[k]) if k in ids else None for k in NS_KINDS}
        for k in NS_KINDS:
            host = as_int(root_ids[k]) if k in root_ids else None
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


def check_names(docs: dict[str, Any], tasks: list[tuple[int, list[int]]], ns: dict[str, int], expected: Expected,
           refuse: Refuse) -> None:
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


def check_userns(docs: dict[str, Any], ns: dict[str, int], expected: Expected, refuse: Refuse) -> None:
    if expected.idmap is None:
        if any(n.startswith("userns-") for n in docs):
            raise refuse(next(n for n in docs if n.startswith("userns-")), "file", "userns: host has none")
        return
    name = f"userns-{ns['user_ns_id']}.img"
    e = one_of(docs, name, refuse)
    want = [{"first": 0, "lower_first": expected.idmap.host, "count": expected.idmap.size}]
    for k in ("uid_map", "gid_map"):
        got = [{x: as_int(ext.get(x, -1)) for x in ("first", "lower_first", "count")} for ext in e.get(k, [])]
        if got != want:
            raise refuse(name, k, f"{got[:2]} (this host's range for the service is {expected.idmap})")


def check_netns(docs: dict[str, Any], ns: dict[str, int], refuse: Refuse) -> None:
    """The network namespace is the slot's, joined (runc's extRootNetNS), never one CRIU would build."""
    name = f"netns-{ns['net_ns_id']}.img"
    if name not in docs:
        raise refuse(name, "file", "missing")
    e = one_of(docs, name, refuse)
    if set(e) != {"ext_key"} or e["ext_key"] != "extRootNetNS":
        raise refuse(name, "ext_key", "not the external namespace a slot gives (its devices, addresses or rules "
                                      "would be made by CRIU)")


def check_cgroups(docs: dict[str, Any], expected: Expected, refuse: Refuse) -> None:
    if "cgroup.img" not in docs:
        return
    e = one_of(docs, "cgroup.img", refuse)
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
