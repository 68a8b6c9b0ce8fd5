"""The installed unit under a real systemd: systemd as PID 1 of a container (scripts/build-images.sh systemd),
activator installed by scripts/install.sh, the unit and socket unit as installed. Checked: READY (active, with
its STATUS=), the socket handoff, the instances inside the unit's cgroup, `systemctl reload` applying a good file
and refusing a bad one, and `systemctl stop` leaving nothing.

The host lends what activator drives: the Docker socket (the image source), CRIU; state_dir is a host directory
bound in (overlayfs cannot stack on the container's own root). Services use `network: none`: the instance network
is tested elsewhere, and the container's network is Docker's."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from activator.runtime import cgroups

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
IMAGE = "activator-test/systemd:latest"
BUSYBOX = "activator-demo/busybox:latest"


def services(**extra: dict[str, object]) -> dict[str, object]:
    # activator.socket as shipped lists 127.0.0.1:8080 and :8081: one service each. userns: host, because this
    # "machine" is a Docker container: its /proc has Docker's masks over it, and the kernel lets a user namespace
    # made inside it mount no fresh proc (mount_too_revealing), which every instance needs; on a real host the
    # default (a user namespace per service) is tested by every other engine test.
    echo = {"image": BUSYBOX, "command": ["echo-server", "9000"], "port": 9000, "listen": "127.0.0.1:8080",
            "network": "none", "userns": "host"}
    hello = {"image": BUSYBOX, "command": ["httpd", "-f", "-p", "8080", "-h", "/www"], "port": 8080,
             "listen": "127.0.0.1:8081", "network": "none", "userns": "host"}
    return {"settings": {"metrics": None, "drain_timeout": "2s"}, "services": {"echo": echo, "hello": hello, **extra}}


class Machine:
    def __init__(self, name: str) -> None:
        self.name = name

    def run(self, *cmd: str, check: bool = True, timeout: float = 120) -> subprocess.CompletedProcess[str]:
        done = subprocess.run(["docker", "exec", self.name, *cmd], capture_output=True, text=True, timeout=timeout)
        if check:
            assert done.returncode == 0, f"{cmd}: {done.stdout}{done.stderr}"
        return done

    def echo(self, port: int, payload: str) -> str:
        code = ("import socket,sys\ns=socket.create_connection(('127.0.0.1',int(sys.argv[1])),timeout=60)\n"
                "s.sendall(sys.argv[2].encode()); s.shutdown(socket.SHUT_WR)\nb=b''\n"
                "while (c:=s.recv(4096)): b+=c\nprint(b.decode(), end='')")
        return self.run("python3", "-c", code, str(port), payload).stdout

    def show(self, prop: str, unit: str = "activator.service") -> str:
        return self.run("systemctl", "show", "-p", prop, "--value", unit).stdout.strip()


@pytest.fixture
def machine(tmp_path: Path) -> Iterator[tuple[Machine, Path]]:
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        if os.environ.get("CI"):
            pytest.fail(f"{IMAGE} is missing: scripts/build-images.sh systemd")
        pytest.skip(f"needs {IMAGE}: scripts/build-images.sh systemd")
    inst = tmp_path / "inst"
    env = os.environ | {"PREFIX": str(inst / "opt"), "SYSCONFDIR": str(inst / "etc"), "UNITDIR": str(inst / "units"),
                        "PYTHON": "/usr/bin/python3"}  # the container's Python is Debian's, as the host's
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "install"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    (inst / "etc" / "config.yaml").write_text(yaml.safe_dump(services()))
    state = tmp_path / "state"
    state.mkdir()
    criu = shutil.which("criu") or "/usr/local/sbin/criu"
    name = f"activator-systemd-{uuid.uuid4().hex[:8]}"
    units = inst / "units"
    # The host's hierarchies, each bound on a tmpfs of the container's own: systemd makes directories and links
    # next to them (cpu,cpuacct, net_cls, ...), and must not make them in the host's /sys/fs/cgroup.
    hierarchies = [a for h in cgroups.hierarchies() for a in ("-v", f"{h}:{h}:rw")]
    subprocess.run([
        "docker", "run", "-d", "--name", name, "--cap-add", "ALL", "--cap-drop", "SYS_RESOURCE",
        "--security-opt", "seccomp=unconfined", "--security-opt", "apparmor=unconfined", "--cgroupns=host",
        "--tmpfs", "/sys/fs/cgroup", *hierarchies, "--tmpfs", "/run", "--tmpfs", "/run/lock", "-e", "container=docker",
        "-v", f"{inst}:{inst}", "-v", f"{state}:/var/lib/activator", "-v", "/var/run/docker.sock:/var/run/docker.sock",
        "-v", f"{criu}:/usr/local/sbin/criu:ro",
        "-v", f"{units}/activator.service:/etc/systemd/system/activator.service:ro",
        "-v", f"{units}/activator.socket:/etc/systemd/system/activator.socket:ro",
        IMAGE, "/lib/systemd/systemd"], check=True, capture_output=True, timeout=120)
    m = Machine(name)
    try:
        deadline = time.monotonic() + 60
        while m.run("systemctl", "is-system-running", check=False).stdout.strip() not in ("running", "degraded"):
            assert time.monotonic() < deadline, m.run("systemctl", "--failed", check=False).stdout
            time.sleep(0.5)
        yield m, inst / "etc" / "config.yaml"
    finally:
        subprocess.run(["docker", "exec", name, "systemctl", "stop", "activator.service", "activator.socket"],
                       capture_output=True, timeout=120)
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, timeout=120)
        shutil.rmtree(state, ignore_errors=True)


def test_the_installed_unit_under_systemd(machine: tuple[Machine, Path]) -> None:
    m, config = machine
    m.run("systemctl", "start", "activator.socket", "activator.service", timeout=300)
    # Type=notify: active only once READY=1 came; STATUS= is what `systemctl status` shows
    assert m.show("ActiveState") == "active"
    # A build that fails is retried with its backoff (its service refuses meanwhile, the other serves): wait for
    # it, and say why if it never comes (once, under a full suite's load, one of the two took a retry).
    deadline = time.monotonic() + 60
    while (text := m.show("StatusText")) != "serving 2 service(s)":
        assert time.monotonic() < deadline, (text, m.run("journalctl", "-u", "activator", "--no-pager").stdout[-3000:])
        time.sleep(0.5)
    assert m.show("TriggeredBy") == "activator.socket"
    journal = m.run("journalctl", "-u", "activator", "--no-pager").stdout
    assert "using the socket passed in for 127.0.0.1:8080" in journal  # handed over by systemd, not bound
    assert m.echo(8080, "through systemd's socket") == "through systemd's socket"

    # the instance runs inside the unit's cgroup: systemd counts it, and stop kills it if activator could not
    cgroup = m.show("ControlGroup")
    instances = m.run("sh", "-c", f"cat /sys/fs/cgroup/systemd{cgroup}/instances/*/cgroup.procs").stdout.split()
    assert instances, "no instance process below the unit's cgroup"
    assert int(m.show("TasksCurrent")) > len(instances)

    # systemctl reload: a good file is applied, a bad one refused while the old one serves
    body = services(more={"image": BUSYBOX, "command": ["echo-server", "9000"], "port": 9000,
                          "listen": "127.0.0.1:8090", "network": "none", "userns": "host"})
    config.write_text(yaml.safe_dump(body))
    m.run("systemctl", "reload", "activator.service", timeout=300)
    assert m.echo(8090, "added by a reload") == "added by a reload"
    config.write_text(config.read_text() + "colour: red\n")
    refused = m.run("systemctl", "reload", "activator.service", check=False, timeout=300)
    assert refused.returncode != 0
    assert m.show("ActiveState") == "active"
    assert m.echo(8080, "still serving") == "still serving"
    assert "colour: unknown key" in m.run("journalctl", "-u", "activator", "--no-pager").stdout

    # systemctl stop: nothing of activator is left
    m.run("systemctl", "stop", "activator.service", timeout=300)
    assert m.show("ActiveState") == "inactive"
    left = m.run("sh", "-c", f"ls -d /sys/fs/cgroup/*{cgroup}/instances/*/ 2>/dev/null; "
                             "grep -c ' /var/lib/activator/instances' /proc/self/mountinfo; "
                             "ls /var/lib/activator/instances; ls /run/netns 2>/dev/null", check=False).stdout.split()
    assert left == ["0"], left
