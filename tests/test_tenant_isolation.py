"""Tenants are strangers: an instance attacks the host, its neighbours and Docker's containers, and each attack is
stopped, while what must work still works (docs/security.md lists each attack with its test here).

The attacker is a real app in a real instance (scripts/images/attacker.c): it forges Ethernet frames with raw
sockets (granted CAP_NET_RAW with cap_add, so that the network guards are what is tested, not the missing
capability), dials over TCP, claims addresses over ARP, and reports what it received. Every target is on this
machine: the host's loopback, the project's bridge, instances, a "remote host" namespace the test makes, and
Docker containers the test starts. Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from .conftest import BUSYBOX, Running, free_port
from .netfixtures import RemoteHost, ask, ask_once, line_server, line_servers, remote_host  # noqa: F401

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

ATTACKER = {"image": BUSYBOX, "command": ["attacker", "9000"], "port": 9000, "cap_add": ["NET_RAW"]}
BRIDGE, GATEWAY = "activator0", "10.89.0.1"


def bridge_mac() -> str:
    return Path(f"/sys/class/net/{BRIDGE}/address").read_text().strip()


def link_local(mac: str) -> str:
    """The EUI-64 link-local address a device with this MAC gets when IPv6 is on."""
    b = [int(x, 16) for x in mac.split(":")]
    b[0] ^= 2
    return f"fe80::{b[0] << 8 | b[1]:x}:{b[2] << 8 | 0xFF:x}:{0xFE << 8 | b[3]:x}:{b[4] << 8 | b[5]:x}"


class Shell:
    """One connection to an attacker-app instance, kept open: commands go to the same instance."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, run: Running, name: str):
        self.reader, self.writer, self.run, self.name = reader, writer, run, name

    async def __call__(self, line: str) -> str:
        return await ask(self.reader, self.writer, line)

    @property
    def att(self) -> Any:
        (inst,) = self.run.act.services[self.name].instances
        return inst.sandbox.attachment


@pytest_asyncio.fixture
async def shells() -> AsyncIterator[list[Shell]]:
    opened: list[Shell] = []
    yield opened
    for s in opened:
        s.writer.close()


async def shell(run: Running, name: str, opened: list[Shell], host: str = "127.0.0.1") -> Shell:
    reader, writer = await asyncio.open_connection(host, run.port(name))
    s = Shell(reader, writer, run, name)
    opened.append(s)
    assert await s("hello") == "hello"  # woke the service: an instance serves this connection
    return s


def udp_listener(host: str) -> tuple[socket.socket, int]:
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((host, 0))
    s.setblocking(False)
    return s, int(s.getsockname()[1])


async def received(sock: socket.socket, within: float = 1.5) -> list[bytes]:
    """What arrived on a UDP socket within a bounded wait."""
    got: list[bytes] = []
    deadline = time.monotonic() + within
    while time.monotonic() < deadline:
        with contextlib.suppress(BlockingIOError):
            while True:
                got.append(sock.recv(2048))
        await asyncio.sleep(0.05)
    return got


async def test_an_instance_cannot_reach_the_hosts_loopback(start, shells) -> None:  # type: ignore[no-untyped-def]
    """Item 1 (the CVE-2020-8558 class): a frame to the gateway's MAC for 127.0.0.1 is dropped."""
    run = await start({"evil": ATTACKER})
    evil = await shell(run, "evil", shells)
    loop_sock, loop_port = udp_listener("127.0.0.1")
    gw_sock, gw_port = udp_listener(GATEWAY)
    with loop_sock, gw_sock:
        a, br = evil.att, bridge_mac()
        assert await evil(f"raw {br} {a.mac} {a.ip} 127.0.0.1 {loop_port} to-loopback") == "raw sent"
        assert await evil(f"raw {br} {a.mac} {a.ip} {GATEWAY} {gw_port} to-gateway") == "raw sent"
        assert await received(loop_sock) == []
        # Positive control: the same forged-by-hand frame, to the host's address on the bridge, arrives.
        assert b"to-gateway" in await received(gw_sock)
    # The service's own loopback clients still work, on the kernel path.
    for _ in range(3):
        assert await ask_once("127.0.0.1", run.port("evil"), "ping") == "ping"
    assert run.act.services["evil"].status()["kernel_path"]


async def test_instances_cannot_reach_each_other_or_the_host_over_ipv6(start, shells) -> None:  # type: ignore[no-untyped-def]
    """Item 2: not over IPv4 (routed or bridged), not over IPv6 link-local; only through a listen address."""
    port = free_port()
    run = await start({"evil": ATTACKER, "victim": ATTACKER | {"cap_add": [], "listen": f"{GATEWAY}:{port}"}})
    victim = await shell(run, "victim", shells, host=GATEWAY)
    evil = await shell(run, "evil", shells)
    assert await victim("listen-udp 7000") == "listening"
    a, v, br = evil.att, victim.att, bridge_mac()
    # TCP straight to the other instance: routed through the host (dropped) ...
    assert (await evil(f"dial {v.ip} 9000 x")).startswith("dial-error")
    # ... over IPv6 link-local, to the instance and to the host: no IPv6 on eth0 or on the bridge.
    assert (await evil(f"dial {link_local(v.mac)}%eth0 9000 x")).startswith("dial-error")
    with socket.socket(socket.AF_INET6) as host6:
        host6.bind(("::", 0))
        host6.listen()
        assert (await evil(f"dial {link_local(br)}%eth0 {host6.getsockname()[1]} x")).startswith("dial-error")
    assert BRIDGE not in Path("/proc/net/if_inet6").read_text().split()  # the bridge has no IPv6 address
    # ... a frame straight to its MAC (layer 2, no router), and one routed by the host: neither arrives.
    assert await evil(f"raw {v.mac} {a.mac} {a.ip} {v.ip} 7000 bridged") == "raw sent"
    assert await evil(f"raw {br} {a.mac} {a.ip} {v.ip} 7000 routed") == "raw sent"
    await asyncio.sleep(1)
    assert await victim("heard") == "heard-nothing"
    # ... and an ARP claim to the host that the victim's address is the attacker's does not take it over.
    assert await evil(f"arp {a.mac} {v.ip} {GATEWAY}") == "arp sent"
    # Positive control: through the victim's service listen address, from the attacker and from the host.
    assert await evil(f"dial {GATEWAY} {port} through-the-service") == "dial through-the-service"
    assert await ask_once(GATEWAY, port, "from-the-host") == "from-the-host"
    assert await victim("still-here") == "still-here"


async def test_no_forged_source_leaves_an_instance(start, shells, remote_host: RemoteHost) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Item 3: egress: false is not escaped by borrowing a neighbour's address, and no forged source (address or
    MAC) reaches the uplink."""
    run = await start({"evil": ATTACKER | {"egress": False}, "peer": ATTACKER})
    evil = await shell(run, "evil", shells)
    peer = await shell(run, "peer", shells)
    remote = remote_host.ns.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with remote:
        remote.bind(("0.0.0.0", 0))
        remote.setblocking(False)
        rport = remote.getsockname()[1]
        a, p, br = evil.att, peer.att, bridge_mac()
        for forged in (f"{br} {a.mac} {p.ip}",  # a neighbour's address (one that may send out)
                       f"{br} {a.mac} 10.89.0.250",  # an unused address of the subnet
                       f"{br} {a.mac} 198.51.100.7",  # an address from nowhere (reflection, one-way exfiltration)
                       f"{br} 02:00:00:00:00:99 {p.ip}"):  # and a forged MAC
            assert await evil(f"raw {forged} {remote_host.ip} {rport} spoofed") == "raw sent"
        assert await received(remote) == []
        # Positive control: the neighbour's own frame, from its own address and MAC, goes out (masqueraded).
        assert await peer(f"raw {br} {p.mac} {p.ip} {remote_host.ip} {rport} genuine") == "raw sent"
        assert b"genuine" in await received(remote)


async def test_no_raw_sockets_by_default(start, shells) -> None:  # type: ignore[no-untyped-def]
    """CAP_NET_RAW is not in the default set (as in Podman's): forging frames needs cap_add: [NET_RAW]."""
    run = await start({"plain": ATTACKER | {"cap_add": []}})
    plain = await shell(run, "plain", shells)
    caps = int((await plain("caps")).split()[1], 16)
    assert not caps & (1 << 13)  # CAP_NET_RAW
    assert caps & (1 << 10)  # CAP_NET_BIND_SERVICE: the rest of Docker's set is there
    a = plain.att
    assert (await plain(f"raw {bridge_mac()} {a.mac} {a.ip} {GATEWAY} 9 x")).startswith("raw-error")


@pytest.fixture
def docker_targets() -> Iterator[dict[str, str]]:
    """Two Docker containers with no published port (default bridge, and an --internal network) and one
    published (on every host address, the bridge's included), all started by this test and removed after it."""
    tag = secrets.token_hex(3)
    net = f"activator-test-internal-{tag}"
    names = [f"activator-test-{tag}-{k}" for k in ("plain", "internal", "published")]
    httpd = ["httpd", "-f", "-p", "8080", "-h", "/www"]
    subprocess.run(["docker", "network", "create", "--internal", net], check=True, capture_output=True)
    try:
        for name, args in zip(names, (["--network", "bridge"], ["--network", net],
                                      ["--network", "bridge", "-p", "8080"]), strict=True):
            subprocess.run(["docker", "run", "-d", "--rm", "--name", name, *args, BUSYBOX, *httpd], check=True,
                           capture_output=True, timeout=60)
        ips = {}
        for name in names[:2]:
            ips[name] = subprocess.run(["docker", "inspect", "-f", "{{range .NetworkSettings.Networks}}"
                                        "{{.IPAddress}}{{end}}", name], capture_output=True, text=True,
                                       check=True).stdout.strip()
        published = subprocess.run(["docker", "port", names[2], "8080"], capture_output=True, text=True,
                                   check=True).stdout.split()[0].rsplit(":", 1)[1]
        yield {"plain": ips[names[0]], "internal": ips[names[1]], "published": published}
    finally:
        subprocess.run(["docker", "rm", "-f", *names], capture_output=True)
        subprocess.run(["docker", "network", "rm", net], capture_output=True)


async def test_docker_containers_are_reached_only_through_published_ports(start, shells, docker_targets) -> None:  # type: ignore[no-untyped-def]
    """Item 4: the firewall hole for instances does not open Docker's networks (internal ones included)."""
    run = await start({"evil": ATTACKER})
    evil = await shell(run, "evil", shells)
    for which in ("plain", "internal"):
        ip = docker_targets[which]
        assert (await evil(f"dial {ip} 8080 GET")).startswith("dial-error"), which
        # Positive control: the container serves (the host reaches it).
        reader, writer = await asyncio.wait_for(asyncio.open_connection(ip, 8080), 5)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        assert b"200 OK" in await asyncio.wait_for(reader.read(), 5)
        writer.close()
    # Positive control: a published port is reachable, as from any other host.
    assert (await evil(f"dial {GATEWAY} {docker_targets['published']} GET")).startswith("dial HTTP/1.")
