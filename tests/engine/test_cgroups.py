"""An instance's cgroups, made by the daemon for restores through CRIU directly, on cgroup v1 and v2 hosts alike.

On v2 the device rules are a BPF program (activator/runtime/devicefilter.py) assembled here rather than by runc:
the kernel's answers are checked against runc's rules for device numbers an attacker would want (memory, the
kernel log, disks, KVM) and for the ones every container needs. This host is a v1 hybrid whose v2 hierarchy
(/sys/fs/cgroup/unified) carries no controllers but enforces device programs, so the program is tested here;
scripts/vm runs this file on a pure v2 host too.
"""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from activator.runtime import cgroups, devicefilter
from tests.conftest import HTTPD, eventually, http_get

pytestmark = [pytest.mark.engine]

#: (kind, major, minor, what it is): what a container must reach, and what an attacker in one would want.
DEVICES = [("c", 1, 3, "null"), ("c", 1, 5, "zero"), ("c", 1, 9, "urandom"), ("c", 5, 2, "ptmx"),
           ("c", 136, 4, "pty4"), ("c", 10, 200, "tun"), ("c", 1, 1, "mem"), ("c", 1, 11, "kmsg"),
           ("c", 10, 232, "kvm"), ("c", 4, 1, "tty1"), ("b", 8, 0, "sda"), ("b", 7, 0, "loop0"),
           ("c", 5, 1, "console")]

PROBE = """
import errno, os, sys
for path in sys.argv[1:]:
    for flag, what in ((os.O_RDONLY, "r"), (os.O_WRONLY, "w")):
        try:
            os.close(os.open(path, flag | os.O_NONBLOCK))
            print(path, what, "open")
        except OSError as e:
            # EPERM is the device program's answer; anything else (ENXIO: no such device) got past it
            print(path, what, "denied" if e.errno == errno.EPERM else "allowed")
"""


def _v2_hierarchy() -> Path:
    return cgroups.ROOT if cgroups.unified() else cgroups.ROOT / "unified"


def test_the_device_program_allows_what_runc_allows_and_nothing_else(tmp_path: Path) -> None:
    v2 = _v2_hierarchy()
    if not (v2 / "cgroup.procs").exists():
        pytest.skip("needs a cgroup v2 hierarchy mounted (/sys/fs/cgroup, or /sys/fs/cgroup/unified beside v1)")
    nodes = tmp_path / "dev"
    nodes.mkdir()
    for kind, major, minor, name in DEVICES:
        mode = 0o666 | (0o20000 if kind == "c" else 0o60000)
        os.mknod(nodes / name, mode, os.makedev(major, minor))
    cg = v2 / f"activator-test-{uuid.uuid4().hex[:8]}"
    cg.mkdir()
    try:
        devicefilter.attach(cg, cgroups.DEVICE_FILTER)
        assert devicefilter.attached(cg) == 1
        out = subprocess.run([sys.executable, "-c", PROBE, *(str(nodes / d[3]) for d in DEVICES)],
                             preexec_fn=lambda: (cg / "cgroup.procs").write_text(str(os.getpid())),
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        seen = {(Path(p).name, w): verdict for p, w, verdict in (ln.split() for ln in out.stdout.splitlines())}
        for kind, major, minor, name in DEVICES:
            for access in "rw":
                expect = any(r.allows(kind, major, minor, access) for r in cgroups.DEVICE_FILTER)
                got = seen[(name, access)] != "denied"
                assert got == expect, f"{name} ({kind} {major}:{minor}) {access}: kernel says {seen[(name, access)]}"
        # the attacker's wishes are denied, and the positive controls pass, whatever the model says
        assert seen[("mem", "r")] == seen[("kmsg", "r")] == seen[("sda", "w")] == seen[("kvm", "r")] == "denied"
        assert seen[("null", "w")] == seen[("zero", "r")] == seen[("urandom", "r")] == "open"
        # outside the cgroup nothing changed: the host's root opens kmsg as before
        fd = os.open(nodes / "kmsg", os.O_RDONLY | os.O_NONBLOCK)
        os.close(fd)
    finally:
        cg.rmdir()


def test_a_rule_that_is_not_a_device_rule_is_refused() -> None:
    for bad in ("x 1:3 rwm", "c 1:3", "c 1:3 rwx", "c a:3 r", "c 1:3 "):
        with pytest.raises(ValueError):
            devicefilter.Rule.parse(bad)


@pytest.mark.asyncio
@pytest.mark.parametrize("layout", ["host", "v2-beside-v1"])
async def test_a_direct_restore_gets_runcs_cgroup(start, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                                   layout: str) -> None:
    """The instance restored through CRIU directly lands in a cgroup made here, with the device rules and limits
    runc would give it; freezing, accounting and removal work on it. `v2-beside-v1` makes the instance's cgroup in
    this hybrid host's v2 hierarchy alone, as on a pure v2 host (which has controllers there; this one has none,
    so no limits are asked for)."""
    if layout == "v2-beside-v1":
        if cgroups.unified():
            pytest.skip("needs a hybrid host (v1 with v2 beside it); on this pure v2 host the `host` case tests v2")
        v2 = cgroups.ROOT / "unified"
        if not (v2 / "cgroup.controllers").exists():
            pytest.skip("needs a cgroup v2 hierarchy mounted beside v1 (/sys/fs/cgroup/unified)")
        monkeypatch.setattr(cgroups, "ROOT", v2)
        monkeypatch.setattr(cgroups, "direct", lambda: True)
        svc = dict(HTTPD)
    else:
        svc = HTTPD | {"resources": {"memory": "96m", "pids": 64, "cpus": 0.5}}
    run = await start({"web": svc})
    assert b"hello from a restored busybox httpd" in await http_get(run.port("web"))
    (inst,) = run.act.services["web"].instances
    assert inst.how == "restore"
    name = inst.sandbox.name
    pid = await inst.sandbox.pid()
    assert pid is not None
    found = cgroups.paths(name)
    assert found, "the instance has no cgroup of ours"
    if cgroups.unified():
        (cg,) = found
        assert str(pid) in (cg / "cgroup.procs").read_text().split()
        assert devicefilter.attached(cg) == 1
        if layout == "host":
            assert (cg / "memory.max").read_text().strip() == str(96 * 2**20)
            assert (cg / "pids.max").read_text().strip() == "64"
            assert (cg / "cpu.max").read_text().split() == ["50000", "100000"]
            assert (cgroups.memory_bytes(name) or 0) > 0
    else:
        devices = next(p for p in found if p.parent.parent.name == "devices")
        assert set((devices / "devices.list").read_text().split("\n")) - {""} == set(cgroups.DEVICE_RULES)
    # standby's freezer and the reaper's removal work on what was made
    fz = cgroups.freezer(name)
    assert fz is not None
    fz.freeze()
    assert fz.frozen()
    fz.thaw()
    assert b"hello" in await http_get(run.port("web"))
    assert cgroups.remove(name) == []

    def gone() -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        return False

    await eventually(gone, what="the app killed with its cgroup")
