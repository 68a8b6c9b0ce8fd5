"""Health checks answered while asleep (issue 22 item 2), through real restores. The prober is 127.0.0.2 (a
loopback source address of its own), everybody else 127.0.0.1: a probe from the prober is answered with what the
template answered, nothing is restored, and probes never keep an instance alive (on the kernel path too: they are
exempt from its DNAT); the same request from anybody else, or another request from the prober, is served by the
app as usual; a service that cannot start is reported down."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from tests.conftest import HTTPD, eventually, faulty_restore, http_get

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

PROBER = "127.0.0.2"
PROBES = [{"http": "/index.html", "from": [f"{PROBER}/32"]}, {"tcp": True, "from": [f"{PROBER}/32"]}]
PAGE = b"hello from a restored busybox httpd"


async def ask(port: int, request: bytes, source: str = PROBER) -> bytes:
    sock = socket.socket()
    sock.bind((source, 0))
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    writer.write(request)
    got = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return got


def get(path: str, method: str = "GET") -> bytes:
    return f"{method} {path} HTTP/1.1\r\nHost: x\r\nUser-Agent: kube-probe/1.29\r\n\r\n".encode()


async def test_probes_are_answered_while_asleep_and_never_wake_it(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"web": HTTPD | {"probes": PROBES, "idle_timeout": "1s"}})
    port, svc = run.port("web"), run.act.services["web"]
    assert svc.checkpoint is not None and svc.checkpoint.probe_answer("/index.html") is not None
    for _ in range(20):
        got = await ask(port, get("/index.html"))
        assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(PAGE + b"\n"), got
    head = await ask(port, get("/index.html", "HEAD"))
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and head.endswith(b"\r\n\r\n") and PAGE not in head
    # A real client as the prober: curl from the prober's address.
    proc = await asyncio.create_subprocess_exec("curl", "-s", "--interface", PROBER, "-w", "%{http_code}",
                                                f"http://127.0.0.1:{port}/index.html", stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    assert out == PAGE + b"\n200", out
    # TCP checks: connect and close, or connect and say nothing past wake_grace: neither wakes it.
    for _ in range(10):
        with socket.create_connection(("127.0.0.1", port), source_address=(PROBER, 0)):
            pass
    with socket.create_connection(("127.0.0.1", port), source_address=(PROBER, 0)):
        await asyncio.sleep(1.0)  # twice wake_grace
    assert svc.instances == [] and not svc._starts and run.metric("activator_restores_total", "web") == 0
    assert run.metric("activator_probes_total", "web", kind="http", answer="recorded") == 22
    await eventually(lambda: run.metric("activator_probes_total", "web", kind="tcp", answer="accepted") == 11,
                     what="the TCP checks counted")
    # Anything else wakes it as before: another path from the prober, the probe's path from anybody else.
    assert PAGE in await ask(port, get("/"))
    assert run.metric("activator_restores_total", "web") == 1
    assert PAGE in await http_get(port, "/index.html")


async def test_probes_never_keep_an_instance_alive(start) -> None:  # type: ignore[no-untyped-def]
    """Warm, a probe is asked of the running app itself (live), on a connection of the activator's, which is
    not a client's: the instance still goes after idle_timeout while the prober keeps probing. On the kernel
    path the prober's connections are exempt from DNAT, so they reach the activator at all."""
    run = await start({"web": HTTPD | {"probes": PROBES, "idle_timeout": "1s"}})
    port, svc = run.port("web"), run.act.services["web"]
    assert PAGE in await http_get(port)  # woken by a client
    (inst,) = svc.instances
    assert svc.mode.name == "kernel" and inst.sandbox.attachment is not None  # warm connections: the kernel path
    t0 = time.monotonic()
    live = 0
    while svc.instances and time.monotonic() - t0 < 10:
        got = await ask(port, get("/index.html"))
        assert got.startswith(b"HTTP/1.1 200 OK\r\n"), got
        live += 1
        with socket.create_connection(("127.0.0.1", port), source_address=(PROBER, 0)):
            pass
        await asyncio.sleep(0.1)
    assert not svc.instances, "probes kept the instance alive"
    assert 1 <= time.monotonic() - t0 < 5
    assert run.metric("activator_probes_total", "web", kind="http", answer="live") >= 3
    assert run.metric("activator_restores_total", "web") == 1
    assert inst.track.served == 1  # only the client's connection reached it through a lease


async def test_a_service_that_cannot_start_is_reported_down(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tools, _ = faulty_restore(tmp_path, restore_fails=True)
    run = await start({"web": HTTPD | {"probes": PROBES, "fallback": "none"}}, **tools)
    port = run.port("web")
    assert (await ask(port, get("/index.html"))).startswith(b"HTTP/1.1 200 OK")  # can start, as far as known
    assert await http_get(port) == b""  # a client wakes it: the restore fails, the service backs off
    got = await ask(port, get("/index.html"))
    assert got.startswith(b"HTTP/1.1 503 "), got
    assert run.metric("activator_probes_total", "web", kind="http", answer="unavailable") == 1
