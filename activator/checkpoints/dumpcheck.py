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

check_docs() is the pure part (decoded images in, DumpError out); check() reads a directory and calls it. The
rooms: dumpexpected.py (Expected, the bounds, the refusal), dumpimages.py (which files, decoded),
dumptasks.py (tree, namespaces, cgroups), dumpfiles.py (mounts, files), dumpcores.py (credentials, limits,
seccomp chains), seccompstub.py (runc's stub before a filter).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .dumpcores import check_cores
from .dumpexpected import DumpError, Expected, Refuse, cap_mask, cap_names, host_limits, one_of
from .dumpfiles import check_descriptors, check_fdinfo, check_files, check_mounts
from .dumpimages import check_pages, check_vmas, kind_of, load_docs, strip_cgroup_roots
from .dumptasks import (
    check_cgroups,
    check_inventory,
    check_names,
    check_namespaces,
    check_netns,
    check_pstree,
    check_userns,
)
from .seccompstub import seccomp_matches

__all__ = ["DumpError", "Expected", "cap_mask", "cap_names", "check", "check_docs", "host_limits", "kind_of",
           "load_docs", "seccomp_matches", "strip_cgroup_roots"]


def check(images: Path, expected: Expected) -> None:
    """Blocking. Refuse (DumpError, one line naming the image file and field) a dump holding anything a template
    of the service dumped on this host would not."""
    check_docs(load_docs(images, expected), expected)


def check_docs(docs: dict[str, Any], expected: Expected) -> None:
    """Pure. docs: image file name -> decoded image (pycriu's dicts), as load_docs() makes them."""
    refuse = Refuse(expected)
    try:
        _check(docs, expected, refuse)
    except DumpError:
        raise
    except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError, RecursionError) as e:
        # a field of the wrong shape somewhere a check did not expect one: still a refusal, never a crash
        raise refuse(refuse.current, "structure", f"malformed ({type(e).__name__}: {str(e)[:80]})") from None


def _check(docs: dict[str, Any], expected: Expected, refuse: Refuse) -> None:
    inv = one_of(docs, "inventory.img", refuse)
    tasks = check_pstree(docs, refuse)
    root_ids = inv.get("root_ids")
    if not isinstance(root_ids, dict):
        raise refuse("inventory.img", "root_ids", "missing")
    check_inventory(inv, refuse)
    ns = check_namespaces(docs, tasks, root_ids, expected, refuse)
    check_names(docs, tasks, ns, expected, refuse)
    mounts = check_mounts(docs, ns["mnt_ns_id"], expected, refuse)
    files = check_files(docs, mounts, ns, expected, refuse)
    check_fdinfo(docs, tasks, files, refuse)
    check_cores(docs, tasks, expected, refuse)
    check_userns(docs, ns, expected, refuse)
    check_netns(docs, ns, refuse)
    check_cgroups(docs, expected, refuse)
    check_descriptors(docs, refuse)
    check_pages(docs, refuse)
    check_vmas(docs, refuse)
    for name in docs:
        if name.startswith("utsns-"):
            uts = one_of(docs, name, refuse)
            for k in ("nodename", "domainname"):
                if len(str(uts.get(k, ""))) > 64:
                    raise refuse(name, k, "longer than 64 characters")
