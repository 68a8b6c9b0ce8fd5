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
from typing import Any

import pytest

from activator.net.marks import HANDED
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


async def test_a_client_that_marks_its_connections_as_the_activators_own_is_counted_all_the_same(
        start: Any, remote_host: RemoteHost) -> None:  # noqa: F811
    """The handoff count leaves out the activator's own connections by their packet mark (HANDED). A client on
    another host (here a namespace behind its own veth) sets that mark on its sockets, to have its connections
    served uncounted: a packet's mark does not cross into the host's namespace, so every one is counted."""
    port = free_port()
    run = await start({"echo": ECHO | {"handoff": True, "listen": f"0.0.0.0:{port}", "idle_timeout": "30s",
                                       "max_instances": 1}})
    assert await echo(port, b"wake") == b"wake"  # positive control: the activator's own marked connection
    svc = run.act.services["echo"]
    assert svc.mode.name == "handoff"
    for _ in range(50):
        sock = remote_host.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_MARK, HANDED)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (remote_host.host_ip, port)), 10)
        reader, writer = await asyncio.open_connection(sock=sock)
        writer.write(b"x")
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 10) == b"x"
        writer.close()
    await eventually(lambda: run.metric("activator_connections_total", "echo") == 51 == served(run, "echo"),
                     timeout=10, what="the marked clients' 50 connections counted with the wake")
