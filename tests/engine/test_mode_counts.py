"""Every steering mode counts what it served the same way (issue 32 item 1): after a client's own count of
connections (or UDP flows) through a service, `activator status`'s served figure, activator_connections_total and
the reap line all say that number, whichever way the connections reached the instance: through the activator
(userspace), DNATed by the kernel (kernel), accepted by the app from the service's own socket (handoff), or UDP
flows relayed while the service wakes and DNATed once it is warm. Before, a handoff service said 1 after ~200."""

from __future__ import annotations

import asyncio
import logging
import re
import socket
import struct
import time
from typing import Any

import pytest
from pyroute2 import netns as pyroute2_netns

from activator.net.netns import HOME_NS
from tests.conftest import ECHO, SLOW, Running, echo, eventually, free_port, loadgen
from tests.engine.test_udp import DNS, ask_in_turn
from tests.netfixtures import RemoteHost, remote_host  # noqa: F401

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

#: a service definition per mode; max_instances 1 so that one instance (one reap line) served every connection
TCP_MODES: dict[str, dict[str, Any]] = {
    "userspace": ECHO | {"network": "none"},
    "kernel": ECHO,
    "handoff": ECHO | {"handoff": True},
}
REAPED = re.compile(r"service=(\S+) instance=\S+ idle for \S+, reaping \(it served (\d+) connection\(s\)")


def served(run: Running, name: str) -> int | None:
    """What `activator status` says the service's one instance served (None: it has none, or several)."""
    service = next(s for s in run.act.status()["services"] if s["name"] == name)
    return service["instances"][0]["served"] if len(service["instances"]) == 1 else None


async def counted_everywhere(run: Running, name: str, sent: int, caplog: pytest.LogCaptureFixture) -> None:
    """status and the metric agree with the client's count while the instance runs; the reap line once idle."""
    await eventually(lambda: served(run, name) == sent == run.metric("activator_connections_total", name),
                     timeout=10, what=f"status and metrics to say {sent}")
    svc = run.act.services[name]
    await eventually(lambda: not svc.instances, timeout=30 * SLOW, what="the instance reaped")
    lines = [m.groups() for r in caplog.records if (m := REAPED.search(r.getMessage()))]
    assert lines == [(name, str(sent))], lines
    assert run.metric("activator_connections_total", name) == sent  # nothing counted twice on the way out


@pytest.mark.parametrize("mode", sorted(TCP_MODES))
async def test_a_tcp_services_counts_agree_with_its_clients_whatever_the_mode(
        start: Any, caplog: pytest.LogCaptureFixture, mode: str) -> None:
    caplog.set_level(logging.INFO, logger="activator.service")
    run = await start({"echo": TCP_MODES[mode] | {"idle_timeout": f"{2 * SLOW:g}s", "max_instances": 1}})
    port = run.port("echo")
    assert await echo(port, b"wake") == b"wake"
    assert run.act.services["echo"].mode.name == mode
    # clients at concurrency, half of them closing their side as soon as they have sent
    result = await loadgen(port, "--connections", "600", "--concurrency", "100", "--fin-every", "2")
    assert result["ok"] == 600, result
    await counted_everywhere(run, "echo", 1 + 600, caplog)


async def test_a_udp_services_flows_are_counted_once_relayed_or_steered(
        start: Any, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="activator.service")
    run = await start({"dns": DNS | {"listen": f"127.0.0.1:{free_port()}", "protocol": "udp", "max_instances": 1,
                                     "idle_timeout": f"{2 * SLOW:g}s", "udp_flow_timeout": "1s"}})
    port = run.port("dns")
    # the first flow wakes the service and is relayed by the activator; the next ones are the kernel's
    assert (await ask_in_turn(port, 1, 1)) == [[0]]
    assert run.act.services["dns"].mode.name == "kernel"
    got = await ask_in_turn(port, 40, 2)
    assert got == [[f * 10, f * 10 + 1] for f in range(40)], got
    await counted_everywhere(run, "dns", 1 + 40, caplog)


def syn(src: str, dst: str, sport: int, dport: int) -> bytes:
    """A bare TCP SYN (the kernel adds the IP header), its checksum over the pseudo-header."""
    head = struct.pack("!HHIIBBHHH", sport, dport, 1000, 0, 5 << 4, 0x02, 64240, 0, 0)
    pseudo = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!BBH", 0, socket.IPPROTO_TCP, len(head))
    data = pseudo + head
    total = sum(int.from_bytes(data[i:i + 2], "big") for i in range(0, len(data), 2))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return head[:16] + struct.pack("!H", ~total & 0xFFFF) + head[18:]


async def test_handshakes_never_finished_are_not_counted_and_pin_no_instance(
        start: Any, caplog: pytest.LogCaptureFixture, remote_host: RemoteHost) -> None:  # noqa: F811
    """A client on another host (a namespace behind its own veth) sends a handoff service SYNs and never finishes
    a handshake (its kernel answers the SYN-ACKs with resets). None is a connection: not counted, and not the
    activity that would keep an idle instance from its reap. Positive control: real connections are counted."""
    caplog.set_level(logging.INFO, logger="activator.service")
    port = free_port()
    run = await start({"echo": ECHO | {"handoff": True, "listen": f"0.0.0.0:{port}", "idle_timeout": f"{3 * SLOW:g}s",
                                       "max_instances": 1}})
    svc = run.act.services["echo"]
    assert await echo(port, b"wake") == b"wake" and svc.mode.name == "handoff"
    pyroute2_netns.setns(remote_host.ns.fd)
    try:
        raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_TCP)
    finally:
        pyroute2_netns.setns(HOME_NS)
    with raw:
        deadline = time.monotonic() + 4 * SLOW  # past idle_timeout, SYNs all along
        sent = 0
        while time.monotonic() < deadline and sent < 2000:
            for sport in range(40000 + sent % 20000, 40000 + sent % 20000 + 20):
                raw.sendto(syn(remote_host.ip, remote_host.host_ip, sport, port), (remote_host.host_ip, 0))
            sent += 20
            await asyncio.sleep(0.05)
    await eventually(lambda: not svc.instances, timeout=10 * SLOW, what="the idle instance reaped despite the SYNs")
    assert run.metric("activator_connections_total", "echo") == 1  # the wake only
    lines = [m.groups() for r in caplog.records if (m := REAPED.search(r.getMessage()))]
    assert lines == [("echo", "1")], lines
    # positive control: the same client's real connections are counted
    for _ in range(5):
        reader, writer = await remote_host.connect(remote_host.host_ip, port)
        writer.write(b"x")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"x"
        writer.close()
    await eventually(lambda: run.metric("activator_connections_total", "echo") == 6, timeout=10,
                     what="the client's 5 real connections counted")
