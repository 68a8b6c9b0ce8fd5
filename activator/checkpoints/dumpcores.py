"""Each thread's core image (pure): credentials within the service's capabilities and ids, limits, loginuid,
OOM score, scheduling, and a seccomp chain that starts with the filter this host installs for the service (apps
may stack more: they only restrict)."""

from __future__ import annotations

import os
from typing import Any

from activator.runtime.seccompref import FLAG_TSYNC
from activator.runtime.spec import ProcessSpec

from .dumpexpected import (
    ID_RANGE,
    MAX_BPF,
    MAX_FILTERS,
    MAX_GROUPS,
    Expected,
    Refuse,
    as_int,
    cap_mask,
    cap_names,
    entries_of,
    one_of,
)
from .seccompstub import seccomp_matches

#: seccomp filter flags a stacked filter may carry (TSYNC, LOG, SPEC_ALLOW); never NEW_LISTENER and the like
STACKED_FLAGS = 1 | 2 | 4
#: thread scheduling policies open to an unprivileged process (SCHED_OTHER, _BATCH, _IDLE)
SCHED_POLICIES = {0, 3, 5}


def _caps_word(words: Any) -> int:
    ws = [as_int(w) for w in (words or [])]
    if len(ws) > 2 or any(not 0 <= w < 1 << 32 for w in ws):
        raise ValueError("capability words")
    return sum(w << (32 * i) for i, w in enumerate(ws))


def check_cores(docs: dict[str, Any], tasks: list[tuple[int, list[int]]], expected: Expected, refuse: Refuse) -> None:
    allowed = cap_mask(expected.capabilities)
    p = expected.process
    seccomp = _seccomp_chains(docs, expected, refuse)
    for pid, threads in tasks:
        # CRIU dumps a chain all threads share only on the leader, flagged TSYNC (restored into every thread at
        # once), and the other threads as "disabled" (criu/seccomp.c try_use_tsync): the leader is read first.
        propagated = False
        for tid in sorted(threads, key=lambda t: t != pid):
            name = f"core-{tid}.img"
            core = one_of(docs, name, refuse)
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
                propagated = bool(chain) and all(as_int(f.get("flags", 0)) & FLAG_TSYNC for f in chain)
            if as_int(th.get("sched_policy", 0)) not in SCHED_POLICIES:
                raise refuse(name, "sched_policy", f"{th.get('sched_policy')} (real-time needs CAP_SYS_NICE)")
            if as_int(th.get("sched_nice", 0)) < expected.nice:
                raise refuse(name, "sched_nice", f"{th.get('sched_nice')} (at least {expected.nice})")


def _task_core(name: str, tc: dict[str, Any], expected: Expected, refuse: Refuse) -> None:
    if "old_seccomp_mode" in tc or "old_seccomp_filter" in tc:
        raise refuse(name, "tc.old_seccomp_mode", "set (CRIU would use it in place of the thread's)")
    if "loginuid" in tc and as_int(tc["loginuid"]) not in expected.loginuid:
        raise refuse(name, "tc.loginuid", f"{tc['loginuid']} (a template here has {sorted(expected.loginuid)})")
    if as_int(tc.get("oom_score_adj", expected.oom_score_adj)) < expected.oom_score_adj:
        raise refuse(name, "tc.oom_score_adj", f"{tc['oom_score_adj']} (at least {expected.oom_score_adj})")
    rl = (tc.get("rlimits") or {}).get("rlimits") or []
    if len(rl) > 16:
        raise refuse(name, "tc.rlimits", f"{len(rl)} limits")
    for i, r in enumerate(rl):
        cur, mx = as_int(r["cur"]), as_int(r["max"])
        bound = expected.rlimits[i] if i < len(expected.rlimits) else (1 << 64) - 1
        if mx > bound or cur > mx:
            raise refuse(name, f"tc.rlimits[{i}]", f"{cur}/{mx} (the hard limit here is at most {bound})")


def _creds(name: str, c: dict[str, Any], allowed: int, p: ProcessSpec, expected: Expected, refuse: Refuse) -> None:
    for k in ("cap_inh", "cap_prm", "cap_eff", "cap_bnd", "cap_amb"):
        mask = _caps_word(c.get(k))
        if mask & ~allowed:
            raise refuse(name, f"creds.{k}", f"{', '.join(cap_names(mask & ~allowed))} beyond the service's set")
    # ids: those of the process spec, or (an app started as root) any id of the container's range
    for ids, own in ((("uid", "euid", "suid", "fsuid"), p.uid), (("gid", "egid", "sgid", "fsgid"), p.gid)):
        for k in ids:
            v = as_int(c[k])
            if not (0 <= v < (expected.idmap.size if expected.idmap else ID_RANGE) if p.uid == 0 else v == own):
                why = "outside the user namespace's ids" if p.uid == 0 else f"the app runs as {own}"
                raise refuse(name, f"creds.{k}", f"{v} ({why})")
    held = [as_int(g) for g in c.get("groups", [])]
    if len(held) > MAX_GROUPS:
        raise refuse(name, "creds.groups", f"{len(held)} groups")
    top = expected.idmap.size if expected.idmap else ID_RANGE
    for g in held:
        if not 0 <= g < top or (p.uid != 0 and g not in (p.gid, *p.additional_gids)):
            raise refuse(name, "creds.groups", f"{g} (not among the app's groups)")
    secbits = as_int(c.get("secbits", 0))
    if not 0 <= secbits < 256:
        raise refuse(name, "creds.secbits", f"{secbits:#x} (unknown bits)")
    if as_int(c.get("no_new_privs", 0)) != 1:
        raise refuse(name, "creds.no_new_privs", f"{c.get('no_new_privs', 0)} (a slot sets it)")
    for k in ("lsm_profile", "lsm_sockcreate", "apparmor_data"):
        if c.get(k) not in (None, "", "unconfined"):
            raise refuse(name, f"creds.{k}", "an LSM label (a slot sets none)")


def _seccomp_chains(docs: dict[str, Any], expected: Expected, refuse: Refuse) -> list[dict[str, Any]]:
    if "seccomp.img" not in docs:
        return []
    entries = entries_of(docs, "seccomp.img", refuse)
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
                    refuse: Refuse, *, propagated: bool = False) -> list[dict[str, Any]]:
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
    idx = as_int(th.get("seccomp_filter", -1))
    chain: list[dict[str, Any]] = []
    seen: set[int] = set()
    while True:
        if not 0 <= idx < len(filters) or idx in seen:
            raise refuse("seccomp.img", f"filter {idx} (of {name})", "missing or a loop in the chain")
        seen.add(idx)
        chain.append(filters[idx])
        if "prev" not in filters[idx]:
            break
        idx = as_int(filters[idx]["prev"])
    for i, f in enumerate(chain):
        prog = _program(f)
        if not 0 < len(prog) <= MAX_BPF or len(prog) % 8:
            raise refuse("seccomp.img", f"filter {i} of {name}", f"{len(prog)} bytes: not a BPF program")
        flags = as_int(f.get("flags", 0))
        if i == 0 and expected.seccomp:
            if not any(seccomp_matches(prog, ref.program) and flags & ~FLAG_TSYNC == ref.flags & ~FLAG_TSYNC
                       for ref in expected.seccomp):
                raise refuse("seccomp.img", f"filter {i} of {name}", "not the filter this host installs for the "
                                                                       "service's seccomp profile")
        elif flags & ~STACKED_FLAGS:
            raise refuse("seccomp.img", f"filter {i} of {name} flags", f"{flags:#x}")
    return chain
