"""Two hosts, one service (issue 20): each "host" is a network namespace of its own, with its own address, state
dir and bridge, and its own `activator run` inside it. A CNCF distribution registry (Debian's docker-registry)
listens on the host side of host A's link; HAProxy (config/haproxy/haproxy.cfg, addresses substituted) spreads
clients over the two.

Host A builds the checkpoint and pushes it; host B pulls it and serves without ever building (its log and its
metrics say so). Then, with curl as the client: 2,000 connections all answered by the two hosts; SIGTERM to
host A's daemon during a load of 2,000 loses none (the agent says drain first); kill -9 of host A's daemon moves
new connections to B within the health-check interval. A checkpoint whose recorded kernel or CPU flags differ is
refused in one line, and one altered in transit is refused by its digest.

Traffic goes only to these namespaces and to loopback.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.checkpoints import ociarchive
from tests.archives import make_key, rewrite
from tests.conftest import write_config
from tests.daemonproc import ACTIVATOR
from tests.netfixtures import RemoteHost, _make_remote

ROOT = Path(__file__).resolve().parents[2]
HAPROXY_CFG = ROOT / "config" / "haproxy" / "haproxy.cfg"
PORT, AGENT, METRICS = 8080, 9300, 9464

pytestmark = pytest.mark.skipif(not (shutil.which("haproxy") and shutil.which("docker-registry")
                                     and shutil.which("skopeo") and shutil.which("curl")),
                                reason="needs haproxy, docker-registry, skopeo and curl (make setup installs them)")


class Host:
    def __init__(self, name: str, remote: RemoteHost, root: Path, registry: str, index: int,
                 trust: dict[str, Any], push: bool = True) -> None:
        self.name, self.remote = name, remote
        self.ip = remote.ip
        self.state = root / name / "state"
        self.log = root / name / "daemon.log"
        self.config = root / name / "services.yaml"
        self.config.parent.mkdir(parents=True)
        self.config.write_text(yaml.safe_dump({
            "settings": {
                "state_dir": str(self.state), "metrics": f"{self.ip}:{METRICS}", "drain_timeout": "5s",
                "network": {"bridge": f"actmh{index}", "subnet": f"10.91.{index}.0/24"},
                "checkpoint_registry": {"repository": f"{registry}/activator", "tls_verify": False, "push": push},
                "checkpoint_trust": trust,
                "agent": {"listen": f"{self.ip}:{AGENT}", "drain_notice": "1.5s"},
            },
            "services": {"web": {
                "image": "activator-demo/busybox:latest", "listen": f"0.0.0.0:{PORT}", "port": 8080,
                "command": ["httpd", "-f", "-p", "8080", "-h", "/www"], "idle_timeout": "60s",
                "share_memory": False, "max_instances": 2, "target_connections": 64,
            }},
        }))
        self.proc: subprocess.Popen[bytes] | None = None

    def inside(self, *argv: str) -> list[str]:
        return ["nsenter", f"--net={self.remote.ns.path}", *argv]

    def start(self) -> None:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.inside(*ACTIVATOR, "run", "-c", str(self.config)), stdout=out,
                                         stderr=out)
        deadline = time.monotonic() + 120
        while "web serving on" not in self.log.read_text() and " ready on " not in self.log.read_text():
            assert self.proc.poll() is None, f"host {self.name} exited: {self.log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"host {self.name} not ready: {self.log.read_text()[-3000:]}"
            time.sleep(0.1)

    def metric(self, name: str, **labels: str) -> float:
        text = urllib.request.urlopen(f"http://{self.ip}:{METRICS}/metrics", timeout=5).read().decode()
        total = 0.0
        for line in text.splitlines():
            m = re.fullmatch(rf"{name}\{{(.*)\}} (\S+)", line)
            if m and all(f'{k}="{v}"' in m.group(1) for k, v in labels.items()):
                total += float(m.group(2))
        return total

    def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)

    def cleanup(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        subprocess.run(self.inside(*ACTIVATOR, "cleanup", "-c", str(self.config)), capture_output=True, timeout=120)


def _remove_remote(remote: RemoteHost, veth: str) -> None:
    subprocess.run(["ip", "link", "del", veth], capture_output=True)
    remote.ns.remove()


@pytest.fixture
def two_hosts(tmp_path: Path) -> Iterator[tuple[Host, Host, str]]:
    base = 150 + int.from_bytes(os.urandom(1), "big") % 40
    (a_remote, a_veth), (b_remote, b_veth) = _make_remote(base), _make_remote(base + 50)
    registry_addr = f"{a_remote.host_ip}:{_free_port(a_remote.host_ip)}"
    (tmp_path / "registry.yml").write_text(yaml.safe_dump({
        "version": 0.1, "log": {"level": "warn"}, "http": {"addr": registry_addr},
        "storage": {"filesystem": {"rootdirectory": str(tmp_path / "registry")}}}))
    with open(tmp_path / "registry.log", "ab") as out:
        registry = subprocess.Popen(["docker-registry", "serve", str(tmp_path / "registry.yml")], stdout=out,
                                    stderr=out)
    # A is the builder: it signs what it pushes. B only pulls: it holds A's public key, and no signing key.
    key = make_key(tmp_path / "keys", "builder")
    pub = str(key) + ".pub"
    hosts = [Host("a", a_remote, tmp_path, registry_addr, base % 200, {"keys": [pub], "sign_key": str(key)}),
             Host("b", b_remote, tmp_path, registry_addr, (base + 50) % 200, {"keys": [pub]}, push=False)]
    try:
        _wait_port(a_remote.host_ip, int(registry_addr.rsplit(":", 1)[1]))
        yield hosts[0], hosts[1], registry_addr
    finally:
        for h in hosts:
            h.cleanup()
        registry.terminate()
        registry.wait(timeout=10)
        _remove_remote(a_remote, a_veth)
        _remove_remote(b_remote, b_veth)


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def _wait_port(host: str, port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection((host, port), timeout=1).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing listens on {host}:{port}"
            time.sleep(0.05)


class Balancer:
    def __init__(self, tmp: Path, a: Host, b: Host) -> None:
        self.port = _free_port("127.0.0.1")
        self.sock = tmp / "haproxy.sock"
        cfg = HAPROXY_CFG.read_text()
        cfg = cfg.replace("192.0.2.11", a.ip).replace("192.0.2.12", b.ip)
        cfg = cfg.replace("bind 127.0.0.1:8080", f"bind 127.0.0.1:{self.port}")
        cfg = cfg.replace("/run/haproxy/activator.sock", str(self.sock))
        assert str(self.sock) in cfg and a.ip in cfg and f":{self.port}" in cfg  # the shipped file, substituted
        (tmp / "haproxy.cfg").write_text(cfg)
        with open(tmp / "haproxy.log", "ab") as out:
            self.proc = subprocess.Popen(["haproxy", "-db", "-f", str(tmp / "haproxy.cfg")], stdout=out,
                                         stderr=subprocess.STDOUT)

    def state(self) -> dict[str, str]:
        """server name -> 'UP 100' / 'DRAIN 0' / 'DOWN ...' from the stats socket."""
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(str(self.sock))
            s.sendall(b"show stat\n")
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        rows = [r.split(",") for r in data.decode().splitlines() if r and not r.startswith("#")]
        return {r[1]: f"{r[17]} {r[18]}" for r in rows if r[0] == "web" and r[1].startswith("host-")}

    def wait(self, want: dict[str, str], timeout: float = 20) -> float:
        t0 = time.monotonic()
        while True:
            try:
                st = self.state()
            except OSError:
                st = {}
            if all(st.get(k, "").startswith(v) for k, v in want.items()):
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, f"balancer state {st}, wanted {want}"
            time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(timeout=10)


def curl(port: int, n: int, tmp: Path, parallel: int = 50) -> list[str]:
    """n requests, each on its own connection (busybox httpd closes after each), by curl --parallel."""
    p = subprocess.run(_curl_argv(port, n, tmp, parallel), capture_output=True, text=True, timeout=300)
    return p.stdout.split()


def served(a: Host | None, b: Host) -> float:
    return (a.metric("activator_connections_total", service="web") if a else 0.0) + \
        b.metric("activator_connections_total", service="web")


def test_two_hosts_one_checkpoint_one_balancer(two_hosts: tuple[Host, Host, str], tmp_path: Path) -> None:
    a, b, _registry = two_hosts
    # Host A: the registry has nothing, so it builds, then pushes in the background.
    a.start()
    deadline = time.monotonic() + 60
    while a.metric("activator_checkpoint_transfers_total", service="web", direction="push", result="ok") < 1:
        assert time.monotonic() < deadline, a.log.read_text()[-3000:]
        time.sleep(0.2)
    assert a.metric("activator_checkpoint_builds_total", service="web") == 1
    assert a.metric("activator_checkpoint_transfers_total", service="web", direction="pull", result="absent") == 1

    # Host B pulls what A built, moves it into its own user namespace range, and never builds.
    b.start()
    log_b = b.log.read_text()
    assert "checkpoint pulled in" in log_b and "nothing was built" in log_b, log_b[-3000:]
    assert "building a checkpoint" not in log_b, log_b[-3000:]
    assert b.metric("activator_checkpoint_builds_total", service="web") == 0
    assert b.metric("activator_checkpoint_transfers_total", service="web", direction="pull", result="ok") == 1
    assert json.loads((b.state / "userns.json").read_text())["web"] != \
        json.loads((a.state / "userns.json").read_text())["web"]  # two hosts on one machine: two ranges

    lb = Balancer(tmp_path, a, b)
    try:
        lb.wait({"host-a": "UP", "host-b": "UP"})
        before = served(a, b)
        codes = curl(lb.port, 2000, tmp_path)
        assert codes.count("200") == 2000, {c: codes.count(c) for c in set(codes)}
        time.sleep(1)  # the kernel path's connections are counted from conntrack samples (250 ms)
        got_a = a.metric("activator_connections_total", service="web")
        got_b = b.metric("activator_connections_total", service="web")
        assert got_a > 0 and got_b > 0, (got_a, got_b)
        assert got_a + got_b - before >= 2000
        assert a.metric("activator_agent_checks_total", service="web", answer="up") > 0

        # Draining host A (SIGTERM) under load: the agent says drain, HAProxy stops sending, nothing is lost.
        load = subprocess.Popen(_curl_argv(lb.port, 2000, tmp_path), stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        assert a.proc is not None
        a.proc.send_signal(signal.SIGTERM)
        lb.wait({"host-a": "DRAIN"}, timeout=5)  # told by the agent while A still serves (drain_notice)
        assert a.proc.wait(timeout=60) == 0, a.log.read_text()[-3000:]
        out, _ = load.communicate(timeout=300)
        codes = out.split()
        assert codes.count("200") == 2000, {c: codes.count(c) for c in set(codes)}
        assert "telling balancers to drain" in a.log.read_text()
        lb.wait({"host-a": "DOWN", "host-b": "UP"})

        # A back (its checkpoint is stored: nothing pulled, nothing built), then kill -9 of its daemon.
        a.start()
        lb.wait({"host-a": "UP", "host-b": "UP"})
        assert a.metric("activator_checkpoint_builds_total", service="web") == 0
        codes = curl(lb.port, 200, tmp_path)  # A gets instances running again
        assert codes.count("200") == 200
        a.stop(signal.SIGKILL)
        moved_in = lb.wait({"host-a": "DOWN"}, timeout=10)
        assert moved_in < 3.0, moved_in  # fall 2 x inter 500 ms, plus a check in flight
        time.sleep(1)
        before_b = b.metric("activator_connections_total", service="web")
        codes = curl(lb.port, 200, tmp_path)
        assert codes.count("200") == 200, {c: codes.count(c) for c in set(codes)}
        time.sleep(1)
        assert b.metric("activator_connections_total", service="web") - before_b >= 200
    finally:
        lb.close()


def _curl_argv(port: int, n: int, tmp: Path, parallel: int = 50) -> list[str]:
    cfg = tmp / f"curl-{time.monotonic_ns()}.cfg"
    cfg.write_text("".join(f'url = "http://127.0.0.1:{port}/?n={i}"\noutput = "/dev/null"\n' for i in range(n)))
    return ["curl", "--parallel", "--parallel-max", str(parallel), "-s", "-m", "20", "-K", str(cfg), "-w",
            "%{http_code}\n"]


def test_a_checkpoint_from_another_kind_of_host_is_refused_in_one_line(tmp_path: Path) -> None:
    hello = {"image": "activator-demo/busybox:latest", "port": 8080,
             "command": ["httpd", "-f", "-p", "8080", "-h", "/www"]}
    (tmp_path / "made").mkdir()
    (tmp_path / "here").mkdir()
    key = make_key(tmp_path / "keys", "builder")
    made = write_config(tmp_path / "made", {"hello": hello}, checkpoint_trust={"sign_key": str(key)})
    here = write_config(tmp_path / "here", {"hello": hello}, checkpoint_trust={"keys": [f"{key}.pub"]})

    def run(*argv: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ACTIVATOR, *argv], capture_output=True, text=True, timeout=300)

    assert run("checkpoint", "hello", "-c", str(made)).returncode == 0
    archive = tmp_path / "hello.tar"
    r = run("checkpoint", "export", "hello", "-o", str(archive), "-c", str(made))
    assert r.returncode == 0, r.stderr

    def kernel(meta: dict[str, Any]) -> None:
        meta["checkpoint"]["origin"]["kernel"] = meta["host"]["kernel"] = "5.10.0-99-amd64"

    def cpu(meta: dict[str, Any]) -> None:
        meta["host"]["cpu_flags"] = [*meta["host"]["cpu_flags"], "zz_no_cpu_has_this"]

    for edit, says in ((kernel, "kernel 5.10.0-99-amd64 (here "), (cpu, "CPU flags this host lacks: zz_no_cpu_has")):
        copy = tmp_path / f"{edit.__name__}.tar"
        rewrite(archive, copy, tmp_path, edit)
        # signed by the trusted builder, as a host of another kind would sign its own: the origin check is what
        # refuses it (test_signed_checkpoints.py plays the attacker without the key)
        assert run("checkpoint", "sign", str(copy), "--key", str(key)).returncode == 0
        r = run("checkpoint", "import", str(copy), "-c", str(here))
        assert r.returncode == 1 and says in r.stderr, r.stderr
        assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
        assert "activator checkpoint hello` builds one on this host" in r.stderr
        assert not (tmp_path / "here" / "state" / "checkpoints" / "hello").exists()
        assert not list((tmp_path / "here" / "state" / "checkpoints").glob(".build-*"))
        assert not list((tmp_path / "here" / "state" / "images").glob("*/rootfs"))  # checked before unpacking

    # Altered in transit: one byte of the layer changed, so its digest no longer matches.
    tampered = tmp_path / "tampered.tar"
    image = ociarchive.read(archive)
    data = bytearray(archive.read_bytes())
    member = image.members["blobs/sha256/" + image.layers[0].digest.partition(":")[2]]
    data[member.offset_data + member.size // 2] ^= 0xFF
    tampered.write_bytes(bytes(data))
    r = run("checkpoint", "import", str(tampered), "-c", str(here))
    assert r.returncode == 1 and "does not match its digest" in r.stderr, r.stderr

    r = run("checkpoint", "push", "hello", "-c", str(here))
    assert r.returncode == 1 and "settings.checkpoint_registry is not set" in r.stderr, r.stderr

    # The positive control: the unaltered archive imports, and serves.
    r = run("checkpoint", "import", str(archive), "-c", str(here))
    assert r.returncode == 0, r.stderr
    r = run("inspect", str(archive), "-c", str(here))
    assert r.returncode == 0 and "made by    activator" in r.stdout, r.stdout
    port = yaml.safe_load(here.read_text())["services"]["hello"]["listen"].rsplit(":", 1)[1]
    with subprocess.Popen([*ACTIVATOR, "run", "-c", str(here)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True) as daemon:
        try:
            assert daemon.stdout is not None
            while " ready on " not in (line := daemon.stdout.readline()):
                assert line, "the daemon exited"
            with socket.create_connection(("127.0.0.1", int(port)), timeout=30) as s:
                s.sendall(b"GET / HTTP/1.0\r\n\r\n")
                assert b"200 OK" in s.recv(4096)
        finally:
            daemon.send_signal(signal.SIGTERM)
            _, err = daemon.communicate(timeout=60)
    assert "building a checkpoint" not in err, err[-2000:]
