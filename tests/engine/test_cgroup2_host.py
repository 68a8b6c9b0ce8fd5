"""The installed unit on a pure cgroup v2 host with systemd as PID 1: the VM of scripts/vm/run (`make test-cgroup2`).

This machine is a cgroup v1 hybrid and cannot become v2, and test_real_systemd.py's systemd runs in a container
with the host's v1 hierarchies bound in; here systemd is really PID 1 and /sys/fs/cgroup is cgroup2fs, so the unit
as scripts/install.sh installs it is started by systemd itself and its instances must sit inside the unit's own
cgroup (Delegate=yes), where systemd counts them and `systemctl stop` would kill what is left. Skipped anywhere
else (it installs units into /run/systemd/system and starts them: only a throwaway machine should).
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from tests.daemonproc import echo_once

pytestmark = [
    pytest.mark.engine,
    pytest.mark.skipif(not (Path("/sys/fs/cgroup/cgroup.controllers").exists() and os.environ.get("ACTIVATOR_VM")
                            and Path("/run/systemd/system").is_dir()),
                       reason="needs a pure cgroup v2 host with systemd as PID 1: scripts/vm/run --cgroup v2"),
]

ROOT = Path(__file__).resolve().parents[2]
BUSYBOX = "activator-demo/busybox:latest"
UNITDIR = Path("/run/systemd/system")  # read by systemd, gone at the VM's power-off
UNITS = ["activator.socket", "activator.service"]


def systemctl(*args: str, check: bool = True, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["systemctl", *args], capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"systemctl {' '.join(args)}: {done.stdout}{done.stderr}"
    return done


def show(prop: str, unit: str = "activator.service") -> str:
    return systemctl("show", "-p", prop, "--value", unit).stdout.strip()


def journal() -> str:
    return subprocess.run(["journalctl", "-u", "activator", "--no-pager", "-o", "cat"], capture_output=True,
                          text=True, timeout=120).stdout


@pytest.fixture
def installed(tmp_path: Path) -> Iterator[Path]:
    inst = tmp_path / "inst"
    env = os.environ | {"PREFIX": str(inst / "opt"), "SYSCONFDIR": str(inst / "etc"), "UNITDIR": str(UNITDIR),
                        "PYTHON": "/usr/bin/python3"}
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "install"], env=env, capture_output=True,
                          text=True, timeout=1200)
    log = inst / "opt" / "share" / "install.log"
    assert done.returncode == 0, done.stdout + done.stderr + (log.read_text()[-3000:] if log.exists() else "")
    # The socket unit as shipped carries 127.0.0.1:8080 and :8081: a service each. The default userns (one per
    # service) and network (the project's bridge): a real host, unlike test_real_systemd's container.
    echo_svc = {"image": BUSYBOX, "command": ["echo-server", "9000"], "port": 9000, "listen": "127.0.0.1:8080"}
    hello = {"image": BUSYBOX, "command": ["httpd", "-f", "-p", "8080", "-h", "/www"], "port": 8080,
             "listen": "127.0.0.1:8081"}
    config = inst / "etc" / "config.yaml"
    config.write_text(yaml.safe_dump({"settings": {"metrics": None, "drain_timeout": "2s"},
                                      "services": {"echo": echo_svc, "hello": hello}}))
    systemctl("daemon-reload")
    try:
        yield config
    finally:
        systemctl("stop", *UNITS, check=False)
        for u in UNITS:
            (UNITDIR / u).unlink(missing_ok=True)
        systemctl("daemon-reload", check=False)


def test_the_installed_unit_keeps_its_instances_in_its_cgroup_on_v2(installed: Path) -> None:
    systemctl("start", *UNITS, timeout=900)
    assert show("ActiveState") == "active", journal()[-3000:]
    deadline = time.monotonic() + 600
    while (text := show("StatusText")) != "serving 2 service(s)":
        assert time.monotonic() < deadline, (text, journal()[-3000:])
        time.sleep(1)
    assert "using the socket passed in for 127.0.0.1:8080" in journal()
    assert echo_once(8080, b"through systemd on cgroup v2", timeout=120) == b"through systemd on cgroup v2"

    # The instance is a process of the unit's cgroup tree, by the kernel's own word (/proc/PID/cgroup), not only
    # by a directory's name: systemd counts it in TasksCurrent and `stop` kills it if activator could not.
    unit_cg = show("ControlGroup")
    assert unit_cg.endswith("/activator.service"), unit_cg
    procs = [p for d in (Path("/sys/fs/cgroup") / unit_cg.lstrip("/") / "instances").glob("*/")
             for p in (d / "cgroup.procs").read_text().split()]
    assert procs, f"no instance process below {unit_cg}/instances; journal: {journal()[-3000:]}"
    for pid in procs:
        line = Path(f"/proc/{pid}/cgroup").read_text().strip()
        assert line.startswith(f"0::{unit_cg}/instances/"), line
    assert int(show("TasksCurrent")) > len(procs)

    # Memory and CPU read from the instance's v2 cgroup files (memory.current, cpu.stat).
    out = subprocess.run([str(installed.parents[1] / "opt" / "venv" / "bin" / "activator"), "status", "--json",
                          "-c", str(installed)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    (inst,) = [i for s in json.loads(out.stdout)["services"] if s["name"] == "echo" for i in s["instances"]]
    assert inst["memory_bytes"] > 0 and inst["cpu_seconds"] > 0, inst

    systemctl("stop", "activator.service", timeout=600)
    assert show("ActiveState") == "inactive"
    left = [d for d in (Path("/sys/fs/cgroup") / unit_cg.lstrip("/")).glob("instances/*/")]
    assert not left, left
    mounts = Path("/proc/self/mountinfo").read_text()
    assert " /var/lib/activator/instances" not in mounts
