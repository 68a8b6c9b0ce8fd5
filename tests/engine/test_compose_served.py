"""A Compose service served for real (the translation itself: tests/unit/test_compose.py)."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.netfixtures import RemoteHost, remote_host  # noqa: F401
from tests.unit.test_compose import load

GATEWAY = "10.89.0.1"  # the default subnet's bridge address


@pytest.mark.engine
@pytest.mark.asyncio
async def test_a_compose_service_is_served(tmp_path: Path) -> None:
    from activator.daemon.server import Activator
    from tests.conftest import BUSYBOX, echo, free_port

    port = free_port()
    cfg = load(tmp_path, f"""
x-activator:
  settings: {{state_dir: {tmp_path / 'state'}, metrics: null}}
services:
  echo:
    image: {BUSYBOX}
    command: echo-server 9000
    ports: ["127.0.0.1:{port}:9000"]
    x-activator: {{idle_timeout: 1m}}
""")
    act = Activator(cfg)  # type: ignore[arg-type]
    try:
        await act.startup()
        assert await echo(port, b"composed") == b"composed"
    finally:
        await act.shutdown()


@pytest.fixture
def _images() -> None:
    for image in ("activator-demo/dns:latest", "activator-demo/redis:latest"):
        if subprocess.run(["docker", "image", "inspect", image], capture_output=True).returncode != 0:
            pytest.fail(f"{image} is missing: run scripts/build-images.sh dns redis")


def _dig(port: int, *args: str) -> str:
    assert shutil.which("dig"), "dig is missing (make setup installs bind9-dnsutils)"
    return subprocess.run(["dig", "@127.0.0.1", "-p", str(port), "+short", "+time=10", "+tries=1", *args],
                          capture_output=True, text=True, timeout=30).stdout.strip()


def _outsiders_dropped() -> int:
    """Packets for the bridge's address from another interface, dropped (the nft counter)."""
    out = subprocess.run(["nft", "list", "counter", "ip", "activator_activator0", "outsiders"], capture_output=True,
                         text=True, check=True).stdout
    return int(re.search(r"packets (\d+)", out).group(1))  # type: ignore[union-attr]


async def _redis_ping(connect: Any, timeout: float = 10) -> bytes:
    reader, writer = await asyncio.wait_for(connect, timeout)
    try:
        writer.write(b"PING\r\n")
        return await asyncio.wait_for(reader.readline(), 30)
    finally:
        writer.close()


@pytest.mark.engine
@pytest.mark.asyncio
@pytest.mark.usefixtures("_images")
async def test_a_udp_service_and_an_internal_only_one_are_served(tmp_path: Path, remote_host: RemoteHost) -> None:  # noqa: F811
    """Issue 31 item 7: `53:53/udp` is served as UDP (dnsmasq, asked with dig); a Redis with no published port is
    served on the bridge's address only: a dependant's instance reaches it by name, the host reaches it, and a
    neighbour that routes the bridge's address through this host does not (control: that neighbour reaches a port
    published on the link to it)."""
    from activator.daemon.server import Activator
    from tests.conftest import BUSYBOX, free_port, http_get, passable

    cgi = passable(tmp_path) / "cgi"
    cgi.mkdir()
    (cgi / "cache").write_text("#!/bin/sh\necho 'Content-Type: text/plain'\necho\n"
                               "printf 'PING\\r\\n' | nc -w 3 cache 6379 || echo 'no answer from cache'\n")
    (cgi / "cache").chmod(0o755)
    dns_port, web_port = free_port(), free_port()
    cfg = load(tmp_path, f"""
x-activator:
  settings: {{state_dir: {tmp_path / 'state'}, metrics: null, drain_timeout: 2s}}
services:
  dns:
    image: activator-demo/dns:latest
    ports: ["127.0.0.1:{dns_port}:53/udp", "127.0.0.1:{dns_port}:53/tcp"]
    x-activator: {{idle_timeout: 1m}}
  cache:
    image: activator-demo/redis:latest
    expose: ["6379"]
    x-activator: {{idle_timeout: 1m}}
  web:
    image: {BUSYBOX}
    command: httpd -f -p 8080 -h /www
    ports: ["127.0.0.1:{web_port}:8080", "{remote_host.host_ip}:{web_port}:8080"]
    volumes: ["{cgi}:/www/cgi-bin:ro"]
    depends_on: [cache]
    x-activator: {{idle_timeout: 1m}}
""")
    dns, cache = cfg.service("dns"), cfg.service("cache")  # type: ignore[attr-defined]
    assert dns.protocol == ("tcp", "udp")
    assert [str(a) for a in cache.listen] == [f"{GATEWAY}:6379"]
    act = Activator(cfg)  # type: ignore[arg-type]
    try:
        await act.startup()
        # a neighbour that routes the bridge's address through this host: dropped before the activator's listener
        # (nothing is woken) ...
        with pytest.raises((OSError, TimeoutError)):
            await _redis_ping(remote_host.connect(GATEWAY, 6379), timeout=5)
        assert not act.services["cache"].instances and _outsiders_dropped() >= 1
        # UDP: the first datagram wakes dnsmasq and is answered; TCP on the same address too
        assert await asyncio.to_thread(_dig, dns_port, "hello.activator.test", "TXT") == \
            '"hello from a restored dnsmasq"'
        assert await asyncio.to_thread(_dig, dns_port, "+tcp", "x.activator.test", "A") == "192.0.2.53"
        # internal-only: the dependant's instance asks it by name, through the bridge
        reply = await http_get(web_port, "/cgi-bin/cache")
        assert b"200 OK" in reply and reply.endswith(b"+PONG\r\n"), reply
        # ... and the host reaches it on the bridge's address
        assert await _redis_ping(asyncio.open_connection(GATEWAY, 6379)) == b"+PONG\r\n"
        # a neighbour on another link: it reaches what is published there (control) ...
        reader, writer = await remote_host.connect(remote_host.host_ip, web_port)
        try:
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            assert b" 200 OK\r\n" in (await asyncio.wait_for(reader.read(), 30))[:20]
        finally:
            writer.close()
        # ... but not the internal-only service, now that an instance runs (the kernel path's DNAT to it)
        dropped = _outsiders_dropped()
        with pytest.raises((OSError, TimeoutError)):
            await _redis_ping(remote_host.connect(GATEWAY, 6379), timeout=5)
        assert _outsiders_dropped() > dropped
        # and what must still work still does
        assert await _redis_ping(asyncio.open_connection(GATEWAY, 6379)) == b"+PONG\r\n"
        assert (await http_get(web_port, "/cgi-bin/cache")).endswith(b"+PONG\r\n")
    finally:
        await act.shutdown()
