"""UDP services (issue 22 item 1) with a real DNS server (Debian's dnsmasq, scripts/build-images.sh dns) on UDP
and TCP port 53, queried with dig and with a DNS client of our own at concurrency: the first datagram wakes the
service and is answered; datagrams that arrive while it restores are held and delivered in order, up to
udp_queue (the rest counted as dropped); warm flows take the kernel path and none is lost; flows spread over
instances; an idle service is reaped once its flows have ended."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import struct
import subprocess
import time
from typing import Any

import pytest

from tests.conftest import eventually, faulty_restore

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

DNS_IMAGE = "activator-demo/dns:latest"
DNS: dict[str, Any] = {"image": DNS_IMAGE, "port": 53, "protocol": ["tcp", "udp"]}
TXT = "hello from a restored dnsmasq"


@pytest.fixture(autouse=True)
def _dns_image() -> None:
    if subprocess.run(["docker", "image", "inspect", DNS_IMAGE], capture_output=True).returncode != 0:
        pytest.fail(f"{DNS_IMAGE} is missing: run scripts/build-images.sh dns (make test does)")


def query(qid: int, name: str, qtype: int = 1) -> bytes:
    labels = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + labels + struct.pack(">HH", qtype, 1)


def answer_of(reply: bytes) -> tuple[int, int, int]:
    """(id, rcode, answer count) of a DNS reply."""
    qid, flags, _qd, an, _ns, _ar = struct.unpack(">HHHHHH", reply[:12])
    return qid, flags & 0xF, an


class Flow(asyncio.DatagramProtocol):
    """One client socket: a UDP flow of its own (its own source port)."""

    def __init__(self) -> None:
        self.replies: list[bytes] = []
        self.got = asyncio.Event()

    def datagram_received(self, data: bytes, addr: Any) -> None:
        self.replies.append(data)
        self.got.set()


async def flow(port: int) -> tuple[asyncio.DatagramTransport, Flow]:
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(Flow, remote_addr=("127.0.0.1", port))
    return transport, proto


async def ask_in_turn(port: int, flows: int, per_flow: int) -> list[list[int]]:
    """`flows` concurrent flows, each a client that sends a query and waits for its answer (2 s) before the next,
    as a resolver does; the ids each got back (flow f's query i has id f * 10 + i, per_flow < 10)."""
    async def one(f: int) -> list[int]:
        transport, proto = await flow(port)
        try:
            for i in range(per_flow):
                proto.got.clear()
                transport.sendto(query(f * 10 + i, f"t{i}.activator.test"))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proto.got.wait(), 2)
            return [answer_of(r)[0] for r in proto.replies]
        finally:
            transport.close()
    return list(await asyncio.gather(*(one(f) for f in range(flows))))


async def run_flows(port: int, flows: int, per_flow: int, timeout: float = 20) -> list[list[int]]:
    """`flows` concurrent flows, each sending `per_flow` (< 10) queries back to back; the ids each got back, in
    order (flow f's query i has id f * 10 + i)."""
    made = [await flow(port) for _ in range(flows)]
    try:
        for f, (transport, _) in enumerate(made):
            for i in range(per_flow):
                transport.sendto(query(f * 10 + i, f"q{i}.activator.test"))
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and any(len(p.replies) < per_flow for _, p in made):
            await asyncio.sleep(0.05)
        return [[answer_of(r)[0] for r in p.replies] for _, p in made]
    finally:
        for transport, _ in made:
            transport.close()


def dig(port: int, *args: str) -> str:
    assert shutil.which("dig"), "dig is missing (make setup installs bind9-dnsutils)"
    return subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=10", "+tries=1", *args],
                          capture_output=True, text=True, timeout=30).stdout.strip()


async def test_a_dns_server_wakes_on_a_datagram_and_serves_warm_flows(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"dns": DNS | {"idle_timeout": "1s", "udp_flow_timeout": "2s", "max_instances": 1}})
    port, svc = run.port("dns"), run.act.services["dns"]
    assert svc.instances == []
    # The first datagram wakes it and is answered (real client: dig over UDP).
    assert await asyncio.to_thread(dig, port, "hello.activator.test", "TXT") == f'"{TXT}"'
    assert run.metric("activator_restores_total", "dns") == 1
    # And TCP on the same address (dig +tcp), as a DNS server listens on both.
    assert await asyncio.to_thread(dig, port, "+tcp", "x.activator.test", "A") == "192.0.2.53"
    # Warm: 200 concurrent flows of 5 queries each (a resolver's pace: the next once answered) take the kernel
    # path; none is lost.
    (inst,) = svc.instances
    got = await ask_in_turn(port, 200, 5)
    assert all(ids == [f * 10 + i for i in range(5)] for f, ids in enumerate(got)), \
        [ids for ids in got if len(ids) != 5][:3]
    assert svc.steering is not None and run.metric("activator_restores_total", "dns") == 1
    await eventually(lambda: inst.kernel_served >= 100, timeout=10, what="the kernel path's flows counted")
    # Idle: reaped once its flows' conntrack entries (udp_flow_timeout) and idle_timeout are over.
    await eventually(lambda: not svc.instances, timeout=20, what="the idle service reaped")
    assert run.metric("activator_idle_reaps_total", "dns") == 1
    # Asleep again: the next datagram wakes it again.
    assert await asyncio.to_thread(dig, port, "again.activator.test", "A") == "192.0.2.53"


async def test_datagrams_held_while_it_restores_arrive_in_order_up_to_the_queue(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tools, _ = faulty_restore(tmp_path, restore_delay=1.5)
    run = await start({"dns": DNS | {"udp_queue": 10, "max_instances": 3, "target_connections": 10,
                                     "udp_flow_timeout": "5s"}}, **tools)
    port, svc = run.port("dns"), run.act.services["dns"]
    # 30 flows of 5 while nothing runs: all held, then delivered in the order they were sent; 30 flows at a
    # target of 10 per instance spread over three instances, each flow on one of them.
    got = await run_flows(port, 30, 5)
    assert all(ids == [f * 10 + i for i in range(5)] for f, ids in enumerate(got)), got[:3]
    assert len(svc.instances) == 3 and run.metric("activator_udp_dropped_total", "dns") == 0
    # One flow floods its queue while a restore runs: udp_queue of them delivered, the rest dropped and counted.
    for inst in list(svc.instances):
        svc._stop(inst)
    await eventually(lambda: not svc.instances and not svc._releasing, what="the instances gone")
    transport, proto = await flow(port)
    for i in range(100):
        transport.sendto(query(i, f"f{i}.activator.test"))
    await eventually(lambda: len(proto.replies) >= 10, timeout=20, what="the queued datagrams answered")
    await asyncio.sleep(0.5)
    assert [answer_of(r)[0] for r in proto.replies] == list(range(10))
    assert run.metric("activator_udp_dropped_total", "dns") == 90
    transport.close()


async def test_a_port_in_use_for_udp_is_one_line(start) -> None:  # type: ignore[no-untyped-def]
    from activator.errors import ActivatorError

    taken = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    taken.bind(("127.0.0.1", 0))
    try:
        with pytest.raises(ActivatorError, match=r"services\.dns\.listen: 127\.0\.0\.1:\d+ \(UDP\) is already in use"):
            await start({"dns": DNS | {"listen": f"127.0.0.1:{taken.getsockname()[1]}", "protocol": "udp"}})
    finally:
        taken.close()
