"""Network fixtures for the tests: a "remote host" (a network namespace the test makes, behind its own veth, with
IPv4 and IPv6 addresses) and one-line servers. Traffic only ever goes to loopback, to the project's own bridge and
instances, or to these namespaces (never to an outside address)."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
import pytest_asyncio
from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from activator.net.netns import HOME_NS, NetNamespace

#: an IPv6 address usable at once, without duplicate address detection (this link has two ends, both ours)
IFA_F_NODAD = 0x02


@dataclass
class RemoteHost:
    ns: NetNamespace
    ip: str  # its address
    host_ip: str  # the host's address on the link to it
    ip6: str
    host_ip6: str

    def socket(self, family: int = socket.AF_INET) -> socket.socket:
        return self.ns.socket(family)

    async def connect(self, addr: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A TCP connection made from inside the remote host."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        sock = self.socket(family)
        try:
            await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, (addr, port)), 10)
        except BaseException:
            sock.close()
            raise
        return await asyncio.open_connection(sock=sock)


def _make_remote(index: int) -> tuple[RemoteHost, str]:
    name = f"acttest-{secrets.token_hex(3)}"
    ns = NetNamespace.create(f"activator-test-{name}")
    veth = f"atr{secrets.token_hex(3)}"
    net4, net6 = f"10.77.{index}", f"fd77:{index:x}::"
    with IPRoute() as ipr:
        ipr.link("add", ifname=veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns.fd})
        (idx,) = ipr.link_lookup(ifname=veth)
        ipr.addr("add", index=idx, address=f"{net4}.1", prefixlen=24)
        ipr.addr("add", index=idx, address=f"{net6}1", prefixlen=64, flags=IFA_F_NODAD)
        ipr.link("set", index=idx, state="up")
    pyroute2_netns.setns(ns.fd)
    try:
        with IPRoute() as inner:
            (eth0,) = inner.link_lookup(ifname="eth0")
            inner.addr("add", index=eth0, address=f"{net4}.2", prefixlen=24)
            inner.addr("add", index=eth0, address=f"{net6}2", prefixlen=64, flags=IFA_F_NODAD)
            inner.link("set", index=eth0, state="up")
            inner.route("add", dst="default", gateway=f"{net4}.1")
    finally:
        pyroute2_netns.setns(HOME_NS)
    return RemoteHost(ns, f"{net4}.2", f"{net4}.1", f"{net6}2", f"{net6}1"), veth


@pytest.fixture
def remote_host() -> Iterator[RemoteHost]:
    remote, veth = _make_remote(200 + secrets.randbelow(50))
    try:
        yield remote
    finally:
        with IPRoute() as ipr, contextlib.suppress(Exception):
            for idx in ipr.link_lookup(ifname=veth):
                ipr.link("del", index=idx)
        remote.ns.remove()


async def _answer_lines(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while line := await reader.readline():
            writer.write(b"pong " + line)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


@pytest_asyncio.fixture
async def line_servers() -> AsyncIterator[list[asyncio.Server]]:
    """Servers that answer each line with `pong LINE`, closed at the end of the test. Start one with
    `await line_server(servers, host=..., sock=...)`."""
    servers: list[asyncio.Server] = []
    yield servers
    for s in servers:
        s.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(s.wait_closed(), 2)


async def line_server(servers: list[asyncio.Server], *, host: str | None = None, port: int = 0,
                      sock: socket.socket | None = None) -> int:
    if sock is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0" if sock.family == socket.AF_INET else "::", port))
        sock.listen(64)
        server = await asyncio.start_server(_answer_lines, sock=sock)
    else:
        server = await asyncio.start_server(_answer_lines, host=host, port=port)
    servers.append(server)
    return int(server.sockets[0].getsockname()[1])


async def ask(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, line: str, timeout: float = 15) -> str:
    writer.write(line.encode() + b"\n")
    await writer.drain()
    return (await asyncio.wait_for(reader.readline(), timeout)).decode().strip()


async def ask_once(host: str, port: int, line: str) -> str:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        return await ask(reader, writer, line)
    finally:
        writer.close()
