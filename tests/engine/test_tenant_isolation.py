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
import struct
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from pyroute2 import netns

from activator.config.model import load_config
from activator.daemon.server import Activator
from activator.errors import ActivatorError
from activator.net.netns import HOME_NS
from activator.net.network import MARK_MASK, SYN_TIMEOUT
from tests.conftest import BUSYBOX, Running, eventually, free_port, write_config
from tests.netfixtures import RemoteHost, ask, ask_once, line_server, line_servers, remote_host  # noqa: F401

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

# userns: host: in its own user namespace an instance holds no capability over its network namespace at all (raw
# sockets are refused whatever cap_add says, test_no_raw_sockets_by_default), so the guards are tested without one
ATTACKER = {"image": BUSYBOX, "command": ["attacker", "9000"], "port": 9000, "cap_add": ["NET_RAW"],
            "userns": "host"}
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
    """CAP_NET_RAW is not in the default set (as in Podman's): forging frames needs cap_add: [NET_RAW], and that
    needs `userns: host` (asking for it in a user namespace is refused: tests/unit/test_config.py)."""
    run = await start({"plain": ATTACKER | {"cap_add": [], "userns": "private"}})
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


def _syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A bare TCP SYN with its IPv4 header (the kernel fills the IP checksum and id of a raw IPPROTO_RAW send)."""
    def csum(data: bytes) -> int:
        data += b"\0" * (len(data) % 2)
        total = sum(struct.unpack(f"!{len(data) // 2}H", data))
        while total >> 16:
            total = (total & 0xFFFF) + (total >> 16)
        return int(~total & 0xFFFF)

    tcp = struct.pack("!HHIIBBHHH", sport, dport, secrets.randbits(32), 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(tcp))
    tcp = tcp[:16] + struct.pack("!H", csum(pseudo + tcp)) + tcp[18:]
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 0, 0, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src), socket.inet_aton(dst))
    return ip + tcp


def _spoofed_syn_flood(remote: RemoteHost, dst: str, port: int, count: int) -> None:
    """`count` SYNs from addresses of the remote host's subnet that nobody holds: their SYN-ACKs go nowhere."""
    netns.setns(remote.ns.fd)
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    finally:
        netns.setns(HOME_NS)
    prefix = remote.ip.rsplit(".", 1)[0]
    with raw:
        for i in range(count):
            src = f"{prefix}.{10 + i % 240}"
            raw.sendto(_syn(src, dst, 1024 + i, port), (dst, 0))


def _our_conntrack(run: Running) -> str:
    base = run.act.network.mark_base  # type: ignore[union-attr]
    return subprocess.run(["conntrack", "-L", "-m", f"{base:#x}/{MARK_MASK:#x}"], capture_output=True,
                          text=True).stdout


async def test_a_spoofed_syn_flood_neither_pins_nor_scales_a_service(start, remote_host: RemoteHost) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    """Item 8: half-open connections are not open ones; the flooded instance is reaped once idle."""
    port = free_port()
    run = await start({"svc": ATTACKER | {"cap_add": [], "listen": f"{remote_host.host_ip}:{port}",
                                          "idle_timeout": "1s", "max_instances": 3, "target_connections": 1}})
    svc = run.act.services["svc"]
    reader, writer = await remote_host.connect(remote_host.host_ip, port)
    assert await ask(reader, writer, "wake") == "wake"
    writer.close()
    await eventually(lambda: svc.status()["kernel_path"], what="the kernel path")
    await asyncio.to_thread(_spoofed_syn_flood, remote_host, remote_host.host_ip, port, 400)
    ct = await asyncio.to_thread(_our_conntrack, run)
    assert ct.count("SYN_RECV") + ct.count("SYN_SENT") > 50, ct[:2000]  # the flood reached the instance
    assert ct.count(" 10 SYN_") + ct.count(" 9 SYN_") > 0  # with the short half-open timeout, not Linux's 60-120 s
    await asyncio.sleep(0.5)
    assert len(svc.instances) == 1 and svc.instances[0].track.kernel == 0  # neither counted nor scaled out
    # Idle after 1 s; its half-open entries waited out (at most SYN_TIMEOUT); then reaped.
    await eventually(lambda: not svc.instances, timeout=1 + SYN_TIMEOUT + 8, what="the flooded instance reaped")
    # Positive control: a real client still wakes and is served.
    reader, writer = await remote_host.connect(remote_host.host_ip, port)
    assert await ask(reader, writer, "again") == "again"
    writer.close()


async def test_client_idle_timeout_holds_on_the_kernel_path(start) -> None:  # type: ignore[no-untyped-def]
    """Item 8: one idle client no longer pins an instance for conntrack's five days."""
    run = await start({"svc": ATTACKER | {"cap_add": [], "client_idle_timeout": "2s"}})
    port = run.port("svc")
    assert await ask_once("127.0.0.1", port, "wake") == "wake"  # spliced by the activator
    await eventually(lambda: run.act.services["svc"].status()["kernel_path"], what="the kernel path")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await ask(reader, writer, "one") == "one"  # the kernel path
        ct = await asyncio.to_thread(_our_conntrack, run)
        (line,) = [ln for ln in ct.splitlines() if "ESTABLISHED" in ln]
        assert int(line.split()[2]) <= 2, line  # the idle timeout, not 432000
        await asyncio.sleep(3)
        with pytest.raises((ConnectionError, asyncio.IncompleteReadError, OSError)):
            writer.write(b"two\n")
            await writer.drain()
            got = await asyncio.wait_for(reader.readline(), 5)
            if not got:
                raise ConnectionResetError("closed")
    finally:
        writer.close()
    # Positive control: a new connection is served.
    assert await ask_once("127.0.0.1", port, "three") == "three"


async def test_a_refused_second_daemon_leaves_the_first_intact_and_two_networks_coexist(  # type: ignore[no-untyped-def]
        start, tmp_path: Path, shells) -> None:
    """Item 12: a daemon refused for a taken bridge changes nothing it did not make; two daemons on two
    networks run side by side, each counting and flushing only its own connections."""
    run = await start({"a": ATTACKER | {"cap_add": []}})
    await shell(run, "a", shells)  # A's instance, kept busy on the kernel path below
    table = run.act.network.table

    def daemon(name: str, **settings: Any) -> Activator:
        d = tmp_path / name
        d.mkdir()
        return Activator(load_config(write_config(d, {name: ATTACKER | {"cap_add": []}}, **settings)))

    refused = daemon("b")
    with pytest.raises(ActivatorError, match="bridge: 'activator0' is already"):
        await refused.startup()
    await refused.shutdown()
    listing = await asyncio.to_thread(lambda: subprocess.run(["nft", "list", "table", "ip", table],
                                                             capture_output=True, text=True))
    assert listing.returncode == 0 and "svc_a" in listing.stdout
    for _ in range(3):  # A's kernel path is whole
        assert await ask_once("127.0.0.1", run.port("a"), "still") == "still"

    other = daemon("c", network={"bridge": "acttestc0", "subnet": "10.91.0.0/24"})
    try:
        await other.startup()
        assert other.network is not None and other.network.mark_base != run.act.network.mark_base
        port_c = int(other.listeners["c"][0].getsockname()[1])
        assert await ask_once("127.0.0.1", port_c, "wake") == "wake"
        reader, writer = await asyncio.open_connection("127.0.0.1", port_c)  # C's kernel path, held open
        assert await ask(reader, writer, "held") == "held"
        svc_c = other.services["c"]
        await eventually(lambda: svc_c.instances and svc_c.instances[0].track.kernel == 1, what="C counts its own")
        await asyncio.sleep(0.5)
        assert run.act.services["a"].instances[0].track.kernel == 0  # A does not count C's connection
        writer.close()
    finally:
        await other.shutdown()
    assert await ask_once("127.0.0.1", run.port("a"), "after") == "after"  # and C's exit left A alone
