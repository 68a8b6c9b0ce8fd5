"""kill -9 at the worst moments, then the next start (or `activator cleanup`) removes everything the dead run
left: containers, mounts, namespaces, cgroups, half-built checkpoints, half-unpacked images, the Docker
container used for the unpack and its anonymous volume."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import BUSYBOX, ECHO, host_resources, write_config
from tests.daemonproc import ACTIVATOR, HOME_NETNS, daemon, echo_once, free_port, stop

pytestmark = pytest.mark.engine

BIG = "activator-test/big:1"


def wait_for(check, what: str, timeout: float = 60):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return result


def unpack_containers(state: Path) -> list[dict[str, object]]:
    out = subprocess.run(["docker", "ps", "-a", "--no-trunc", "--filter", f"label=org.activator.unpack-for={state}",
                          "--format", "{{json .}}"], capture_output=True, text=True, check=True).stdout
    return [json.loads(line) for line in out.splitlines()]


@pytest.fixture(scope="module")
def big_image() -> Iterator[str]:
    """The busybox image plus 300 MB and a VOLUME: an unpack slow enough to be killed in the middle of."""
    root = Path(tempfile.mkdtemp(prefix="activator-big-"))
    try:
        subprocess.run(f"docker export $(docker create {BUSYBOX} /) | tar -x -C {root}", shell=True, check=True)
        with open(root / "ballast", "wb") as f:
            for _ in range(300):
                f.write(b"\1" * 2**20)
        subprocess.run(f"tar -C {root} -c . | docker import --change 'VOLUME /data' "
                       f"--change 'CMD [\"echo-server\", \"9000\"]' - {BIG}", shell=True, check=True,
                       capture_output=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
        subprocess.run("docker container prune -f", shell=True, capture_output=True)
    yield BIG
    subprocess.run(["docker", "rmi", "-f", BIG], capture_output=True)


def test_kill_9_during_an_image_unpack(tmp_path: Path, big_image: str) -> None:
    cfg = write_config(tmp_path, {"big": ECHO | {"image": big_image}})
    state = tmp_path / "state"
    with subprocess.Popen([*ACTIVATOR, "checkpoint", "big", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as proc:
        wait_for(lambda: list(state.glob("images/*/.unpack-*/bin")), "the unpack to be under way")
        proc.kill()
    (leftover,) = unpack_containers(state)
    mounts = subprocess.run(["docker", "inspect", "-f", "{{json .Mounts}}", str(leftover["ID"])],
                            capture_output=True, text=True, check=True).stdout
    (volume,) = [m["Name"] for m in json.loads(mounts) if m["Type"] == "volume"]
    assert list(state.glob("images/*/.unpack-*"))
    out = subprocess.run([*ACTIVATOR, "cleanup", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "partial" in out.stdout and "image export container" in out.stdout
    assert not list(state.glob("images/*/.unpack-*")) and unpack_containers(state) == []
    volumes = subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True, text=True).stdout.split()
    assert volume not in volumes
    # A normal unpack leaves no container and no volume behind either.
    before = set(volumes)
    done = subprocess.run([*ACTIVATOR, "checkpoint", "big", "-c", str(cfg)], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert unpack_containers(state) == []
    after = set(subprocess.run(["docker", "volume", "ls", "-q"], capture_output=True, text=True).stdout.split())
    assert after <= before


def test_kill_9_during_a_checkpoint_build(tmp_path: Path) -> None:
    slow = ECHO | {"command": ["sh", "-c", "sleep 60; exec echo-server 9000"], "readiness": {"timeout": "2m"}}
    port = free_port()
    cfg = write_config(tmp_path, {"slow": slow | {"listen": f"127.0.0.1:{port}"}})
    state = tmp_path / "state"
    with subprocess.Popen([*ACTIVATOR, "run", "-c", str(cfg)], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL) as proc:
        wait_for(lambda: host_resources(state)["runc"], "the template container")
        proc.kill()
    orphans = host_resources(state)
    assert list((state / "checkpoints").glob(".build-*")) and orphans["runc"] and orphans["mounts"]
    (name,) = orphans["runc"]
    assert f"activator-{name}" in orphans["netns"]
    fast = ECHO | {"listen": f"127.0.0.1:{port}"}  # the same service, now quick to build
    write_config(tmp_path, {"slow": fast})
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], tmp_path / "activator.log") as proc:
        log = (tmp_path / "activator.log").read_text()
        assert "cleaned up after a previous run" in log and "partial checkpoints/.build-slow-" in log
        left = host_resources(state)
        assert name not in left["runc"] and f"activator-{name}" not in left["netns"]
        assert not list((state / "checkpoints").glob(".build-*"))
        assert echo_once(port, b"built and served") == b"built and served"
        assert stop(proc) == 0
    res = host_resources(state)
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == [] and set(res["netns"]) <= HOME_NETNS


def test_kill_9_then_restart_cleans_every_orphan(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}})
    state, log = tmp_path / "state", tmp_path / "activator.log"
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        assert echo_once(port, b"first life") == b"first life"
        assert echo_once(port, b"steered") == b"steered"  # the instance is in the kernel's rule now
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
    orphans = host_resources(state)
    assert orphans["mounts"] and len(orphans["dirs"]) == 1 and orphans["procs"]  # the app, still running
    (name,) = orphans["dirs"]
    assert f"activator-{name}" in orphans["netns"]
    assert any(c.endswith(f"/activator/{name}") for c in orphans["cgroups"])
    assert orphans["slots"]  # and the slot prepared for the next restore, with its idle CRIU
    net = network_state()
    assert net["veths"] and "dnat ip to" in net["table"] and net["firewall"]  # what the dead one made
    old_veths = net["veths"]
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        text = log.read_text()
        assert "cleaned up after a previous run" in text and "nftables table ip activator_activator0" in text
        left = host_resources(state)
        assert name not in left["runc"] and f"activator-{name}" not in left["netns"] and not left["dirs"]
        assert not [c for c in left["cgroups"] if c.endswith(f"/activator/{name}")]
        assert not set(orphans["procs"]) & set(left["procs"]) and not set(orphans["slots"]) & set(left["slots"])
        fresh = network_state()
        assert not set(old_veths) & set(fresh["veths"]) and "dnat ip to" not in fresh["table"]
        assert len(fresh["firewall"]) == 2  # the hole again, once
        assert echo_once(port, b"second life") == b"second life"
        assert stop(proc) == 0
    res = host_resources(state)
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == [] and res["procs"] == []
    assert res["slots"] == [] and set(res["netns"]) <= HOME_NETNS
    gone = network_state()
    assert gone == {"veths": [], "table": "", "firewall": [], "bridge": False}


def network_state() -> dict[str, Any]:
    """What activator made on the host's network (bridge activator0): veths, its nft table, iptables rules."""
    links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    veths = [ln.split(":")[1].strip().split("@")[0] for ln in links.splitlines() if "master activator0" in ln]
    table = subprocess.run(["nft", "list", "table", "ip", "activator_activator0"], capture_output=True,
                           text=True).stdout
    rules = subprocess.run(["iptables", "-S", "DOCKER-USER"], capture_output=True, text=True).stdout
    return {"veths": veths, "table": table, "firewall": [r for r in rules.splitlines() if "activator activator0" in r],
            "bridge": ": activator0:" in links}

