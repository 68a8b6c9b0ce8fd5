"""Instances on a real network: outbound connections to the host and to a remote host, names from /etc/hosts,
egress: false, a pool opened before the dump, remote clients' addresses, IPv6 listen addresses, no leaks, and
one-line errors for a bad network setup. Against real runc, CRIU, nftables and namespaces."""

from __future__ import annotations

import asyncio
import re
import subprocess
from pathlib import Path

import pytest

from activator.net.network import MARK_MASK, connections
from tests.conftest import BUSYBOX, eventually, free_port, write_config
from tests.netfixtures import RemoteHost, ask, ask_once, line_server, line_servers, remote_host  # noqa: F401

from .test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.engine

PROBE = {"image": BUSYBOX, "command": ["netprobe", "9000"], "port": 9000}
GATEWAY = "10.89.0.1"


@pytest.mark.asyncio
async def test_egress_to_the_host_and_to_a_remote_host(start, remote_host: RemoteHost, line_servers) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    run = await start({"probe": PROBE | {"extra_hosts": {"db.internal": remote_host.ip}}})
    port = run.port("probe")
    on_host = await line_server(line_servers, host=GATEWAY)  # the bridge's host address
    on_remote = await line_server(line_servers, sock=remote_host.socket())  # a "remote host": forwarded
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        assert await ask(reader, writer, f"dial {GATEWAY} {on_host} hello") == "dial pong hello"
        assert await ask(reader, writer, f"dial {remote_host.ip} {on_remote} hi") == "dial pong hi"
        assert await ask(reader, writer, "resolve db.internal") == f"resolve {remote_host.ip}"
        assert await ask(reader, writer, f"dial db.internal {on_remote} by-name") == "dial pong by-name"
        assert await ask(reader, writer, "resolve host.activator.internal") == f"resolve {GATEWAY}"
    finally:
        writer.close()
    (inst,) = run.act.services["probe"].instances
    resolv = (inst.sandbox.layout.rootfs / "etc" / "resolv.conf").read_text()
    assert "nameserver" in resolv and "nameserver 127." not in resolv


@pytest.mark.asyncio
async def test_egress_false_blocks_outbound_but_keeps_the_service(start, remote_host: RemoteHost, line_servers) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    run = await start({"probe": PROBE | {"egress": False}})
    port = run.port("probe")
    on_host = await line_server(line_servers, host=GATEWAY)
    on_remote = await line_server(line_servers, sock=remote_host.socket())
    for _ in range(2):  # the first connection is spliced by the activator, the second steered by the kernel
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        try:
            assert (await ask(reader, writer, "peer")).startswith("peer ")  # reachable
            assert (await ask(reader, writer, f"dial {GATEWAY} {on_host} x")).startswith("dial-error")
            assert (await ask(reader, writer, f"dial {remote_host.ip} {on_remote} x")).startswith("dial-error")
        finally:
            writer.close()


@pytest.mark.asyncio
async def test_a_pool_opened_before_the_dump_is_restored_closed_and_reconnects(start, line_servers) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    # The app connects to its "database" before it listens, and keeps that connection for every request.
    db = await line_server(line_servers, host="0.0.0.0")  # reached through the bridge's address
    run = await start({"probe": PROBE | {"environment": {"POOL": f"{GATEWAY}:{db}"}}})
    port = run.port("probe")
    assert run.metric("activator_restores_total", "probe") == 0
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        # Restored closed (CRIU tcp-close): the app sees the failure once, reconnects, and carries on.
        assert await ask(reader, writer, "pool first") == "pool-reconnected pong first"
        assert await ask(reader, writer, "pool second") == "pool pong second"
    finally:
        writer.close()
    assert run.metric("activator_restores_total", "probe") == 1 and run.act.services["probe"].instances[0].how == \
        "restore"


@pytest.mark.asyncio
async def test_a_remote_client_keeps_its_address_on_the_kernel_path(start, remote_host: RemoteHost) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    port = free_port()
    run = await start({"probe": PROBE | {"listen": f"{remote_host.host_ip}:{port}"}})
    seen = []
    for _ in range(3):
        reader, writer = await remote_host.connect(remote_host.host_ip, port)
        seen.append(await ask(reader, writer, "peer"))
        writer.close()
    # The first one woke the service and was spliced by the activator (the app sees the activator's end inside
    # its namespace); the rest were steered by the kernel, which keeps the client's own address.
    assert seen[0].startswith("peer 127.0.0.1 ")
    assert all(s.startswith(f"peer {remote_host.ip} ") for s in seen[1:]), seen
    assert run.act.services["probe"].status()["kernel_path"]


@pytest.mark.asyncio
async def test_ipv6_listen_addresses_loopback_and_not(start, remote_host: RemoteHost) -> None:  # type: ignore[no-untyped-def]  # noqa: F811
    loop6, remote6 = free_port(), free_port()
    run = await start({"probe": PROBE | {"listen": [f"[::1]:{loop6}", f"[{remote_host.host_ip6}]:{remote6}"]}})
    for _ in range(2):
        assert (await ask_once("::1", loop6, "peer")).startswith("peer ")
        reader, writer = await remote_host.connect(remote_host.host_ip6, remote6)
        assert (await ask(reader, writer, "peer")).startswith("peer ")
        writer.close()
    # IPv6 listen addresses are served through the activator (no IPv4 kernel rule can take them).
    assert run.act.services["probe"].instances[0].track.served == 4


def _links(prefix: str) -> list[str]:
    out = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
    return [line.split(":")[1].strip().split("@")[0] for line in out.splitlines() if f": {prefix}" in line]


def _nft(table: str) -> str:
    return subprocess.run(["nft", "list", "table", "ip", table], capture_output=True, text=True).stdout


@pytest.mark.asyncio
async def test_fifty_restore_and_reap_cycles_leak_no_link_rule_or_conntrack_entry(start) -> None:  # type: ignore[no-untyped-def]
    links_before = set(_links("av"))
    run = await start({"probe": PROBE | {"idle_timeout": "100ms"}})
    port = run.port("probe")
    svc = run.act.services["probe"]
    for i in range(50):
        assert (await ask_once("127.0.0.1", port, "peer")).startswith("peer 127.0.0.1 ")  # spliced: it woke it
        assert (await ask_once("127.0.0.1", port, "peer")).startswith(f"peer {GATEWAY} ")  # the kernel path
        await eventually(lambda: not svc.instances and not svc._stopping, what=f"reap {i}")
    assert run.metric("activator_restores_total", "probe") == 50
    (slot,) = [sb.attachment for _, sb in svc.launcher.slots]
    assert slot is not None  # the one slot prepared ahead (prepared_slots: 1), and nothing else:
    assert set(_links("av")) == links_before | {slot.veth}
    table = run.act.network.table
    # pyroute2's synchronous API (and subprocesses) must never run on the event loop's thread.
    base = run.act.network.mark_base
    assert await asyncio.to_thread(_leftovers, table, base, f"{slot.mark:x}", str(slot.ip)) == {}


def _leftovers(table: str, base: int, slot_mark: str, slot_ip: str) -> dict[str, object]:
    """What 50 cycles may have left: instance addresses or marks in our table (the prepared slot's aside),
    conntrack entries with our marks, routes or addresses in the subnet beyond the bridge's own."""
    found: dict[str, object] = {}
    listing = _nft(table)
    marks = {m for m in re.findall(r"(?:in_|out_|ct mark 0x)(a[0-9a-f]{7})", listing)}
    addrs = set(re.findall(r"10\.89\.0\.\d+", listing)) - {slot_ip, "10.89.0.0", "10.89.0.1"}
    if marks - {slot_mark, f"{base:x}"} or addrs:  # the daemon's own base mark names its chains (the amplify jump)
        found["nft"] = listing
    if connections(base):
        found["open"] = connections(base)
    ct = subprocess.run(["conntrack", "-L", "-m", f"{base:#x}/{MARK_MASK:#x}"], capture_output=True,
                        text=True).stdout
    if ct.strip():
        found["conntrack"] = ct
    routes = subprocess.run(["ip", "-4", "route"], capture_output=True, text=True).stdout
    extra = [r for r in routes.splitlines() if "10.89.0." in r and not r.startswith("10.89.0.0/24 dev activator0")]
    if extra:
        found["routes"] = extra
    addr_lines = subprocess.run(["ip", "-4", "-o", "addr"], capture_output=True, text=True).stdout
    extra = [a for a in addr_lines.splitlines() if "10.89.0." in a and "10.89.0.1/" not in a]  # (slots: own netns)
    if extra:
        found["addresses"] = extra
    return found


def test_bad_network_settings_are_one_line_errors(tmp_path: Path) -> None:
    # A subnet the host already uses (an address and a route of a link made here, not by activator).
    subprocess.run(["ip", "link", "add", "acttestbr0", "type", "bridge"], check=True)
    try:
        subprocess.run(["ip", "addr", "add", "10.88.5.1/24", "dev", "acttestbr0"], check=True)
        subprocess.run(["ip", "link", "set", "acttestbr0", "up"], check=True)
        cfg = write_config(tmp_path, {"probe": PROBE}, network={"subnet": "10.88.5.0/24"})
        assert_one_line_error(run_cli("checkpoint", "probe", "-c", str(cfg)), "settings.network.subnet",
                              "10.88.5.0/24 overlaps", "acttestbr0", "pick a private range")
        # A bridge name that belongs to something else.
        cfg = write_config(tmp_path, {"probe": PROBE}, network={"bridge": "acttestbr0", "subnet": "10.89.9.0/24"})
        assert_one_line_error(run_cli("checkpoint", "probe", "-c", str(cfg)), "settings.network.bridge",
                              "'acttestbr0' is already a bridge interface", "set settings.network.bridge")
    finally:
        subprocess.run(["ip", "link", "del", "acttestbr0"], capture_output=True)
    # No libnftables (a host whose CRIU does not need it, without the nftables package): said in one line.
    from activator.errors import PreflightError
    from activator.net.nft import Nft

    with pytest.raises(PreflightError) as e:
        Nft("/nonexistent/libnftables.so.1")
    assert "libnftables" in str(e.value) and "make setup" in str(e.value) and "network: none" in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.asyncio
async def test_an_app_listening_on_loopback_only_is_served_through_the_activator(start) -> None:  # type: ignore[no-untyped-def]
    httpd = {"image": BUSYBOX, "command": ["httpd", "-f", "-p", "127.0.0.1:8080", "-h", "/www"], "port": 8080}
    run = await start({"web": httpd})
    port = run.port("web")
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n")
        assert b"200 OK" in await asyncio.wait_for(reader.read(), 10)
        writer.close()
    svc = run.act.services["web"]
    assert svc.checkpoint is not None and not svc.checkpoint.kernel_path and svc.mode.name == "userspace"
    assert svc.instances[0].track.served == 3  # every one through the activator: the kernel could not reach 127.0.0.1


def test_an_app_listening_on_the_templates_own_address_is_refused(tmp_path: Path) -> None:
    # The template is the only thing on the bridge, so it gets the subnet's first free address.
    addr = "$(ip -4 -o addr show eth0 | sed 's/.*inet \\([0-9.]*\\).*/\\1/')"
    httpd = {"image": BUSYBOX, "command": ["sh", "-c", f"exec httpd -f -p {addr}:8080 -h /www"], "port": 8080}
    cfg = write_config(tmp_path, {"web": httpd})
    proc = run_cli("checkpoint", "web", "-c", str(cfg))
    assert_one_line_error(proc, "service 'web'", "the app listens on 10.89.0.2:8080 only",
                          "make it listen on every address (0.0.0.0) or on 127.0.0.1")
    assert not list((tmp_path / "state" / "checkpoints").glob("web*"))
