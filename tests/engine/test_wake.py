"""What wakes a service, and what may not keep it awake: port scans and silent clients against real instances."""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest

from tests.conftest import ECHO, echo, eventually, open_echo

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

BANNER = ECHO | {"environment": {"BANNER": "220 hello"}}  # speaks first, like SMTP or MySQL


async def scan(port: int, *, reset: bool) -> None:
    """What a connect scan does: complete the handshake, send nothing, go (FIN, or RST with SO_LINGER 0)."""
    s = socket.socket()
    s.setblocking(False)
    await asyncio.get_running_loop().sock_connect(s, ("127.0.0.1", port))
    if reset:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


async def test_a_port_scan_wakes_nothing(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"wake_grace": "30s"}})
    port = run.port("echo")
    for i in range(40):
        await scan(port, reset=i % 2 == 0)
    await eventually(lambda: run.metric("activator_ignored_connections_total", "echo") == 40,
                     what="every scan counted as ignored")
    assert run.metric("activator_restores_total", "echo") == 0
    assert run.act.services["echo"].instances == [] and not run.act.services["echo"]._starts
    assert run.metric("activator_open_connections", "echo") == 0
    # A real client still wakes it.
    assert await echo(port, b"real") == b"real"
    assert run.metric("activator_restores_total", "echo") == 1


async def test_the_first_byte_wakes_a_held_connection(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"wake_grace": None}})
    port = run.port("echo")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await eventually(lambda: run.metric("activator_open_connections", "echo") == 1, what="the connection held")
    await asyncio.sleep(0.5)  # silent and held: no grace configured, so nothing may start
    assert run.metric("activator_restores_total", "echo") == 0 and not run.act.services["echo"]._starts
    writer.write(b"now")
    assert await asyncio.wait_for(reader.readexactly(3), 30) == b"now"
    assert run.metric("activator_restores_total", "echo") == 1
    writer.close()


async def test_a_silent_client_wakes_after_the_grace(start) -> None:  # type: ignore[no-untyped-def]
    """A server-speaks-first client sends nothing until it hears the banner: the grace wakes the service."""
    run = await start({"smtp": BANNER | {"wake_grace": "200ms"}})
    reader, writer = await asyncio.open_connection("127.0.0.1", run.port("smtp"))
    assert await asyncio.wait_for(reader.readline(), 30) == b"220 hello\n"
    writer.write(b"QUIT")
    assert await asyncio.wait_for(reader.readexactly(4), 30) == b"QUIT"
    writer.close()
    assert run.metric("activator_ignored_connections_total", "smtp") == 0


async def test_wake_on_connect_wakes_at_once(start) -> None:  # type: ignore[no-untyped-def]
    # The grace is far longer than the test: only the connection itself can have woken it.
    run = await start({"smtp": BANNER | {"wake_on": "connect", "wake_grace": "1h"}})
    port = run.port("smtp")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(reader.readline(), 30) == b"220 hello\n"
    writer.close()
    await scan(port, reset=True)  # with wake_on: connect nothing is ignored
    assert run.metric("activator_ignored_connections_total", "smtp") == 0


async def test_warm_service_serves_server_speaks_first_without_grace(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"smtp": BANNER | {"wake_grace": "1h", "wake_on": "data"}})
    port = run.port("smtp")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"x")  # wake it once with a byte
    assert await asyncio.wait_for(reader.readline(), 30) == b"220 hello\n"
    # An instance is up: a silent client is put through at once and hears the banner.
    r2, w2 = await asyncio.open_connection("127.0.0.1", port)
    assert await asyncio.wait_for(r2.readline(), 30) == b"220 hello\n"
    writer.close()
    w2.close()


async def test_client_idle_timeout_frees_instances_pinned_by_silent_clients(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"wake_grace": "100ms", "client_idle_timeout": "500ms", "idle_timeout": "200ms",
                                       "max_instances": 2, "target_connections": 100}})
    port = run.port("echo")
    svc = run.act.services["echo"]
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(200)]
    # They wake the service after the grace and pin both instances...
    await eventually(lambda: len(svc.instances) == 2, what="two instances for 200 connections")
    # ...until the idle timeout closes every one of them (each sees EOF), and the instances are reaped.
    for reader, _ in silent:
        assert await asyncio.wait_for(reader.read(), 30) == b""
    assert run.metric("activator_client_idle_closes_total", "echo") == 200
    await eventually(lambda: not svc.instances, what="the instances reaped")
    for _, w in silent:
        w.close()


async def test_client_idle_timeout_spares_active_connections(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"client_idle_timeout": "300ms"}})
    reader, writer = await open_echo(run.port("echo"))
    for i in range(8):  # ~1.6 s of a connection that talks every 200 ms: five idle timeouts long
        await asyncio.sleep(0.2)
        writer.write(b"%d" % i)
        assert await asyncio.wait_for(reader.readexactly(1), 10) == b"%d" % i
    assert run.metric("activator_client_idle_closes_total", "echo") == 0
    writer.close()


async def test_clients_that_never_speak_do_not_pin_an_instance(start) -> None:  # type: ignore[no-untyped-def]
    """Issue 16 item 9: silent connections wake a service after wake_grace (server-speaks-first protocols), but
    are closed client_silent_timeout after they came; a quiet session that has spoken is kept."""
    run = await start({"echo": ECHO | {"wake_grace": "200ms", "client_silent_timeout": "1s"}})
    port = run.port("echo")
    # All held by the activator (no instance yet): the first to pass wake_grace wakes the service.
    silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(20)]
    talker_r, talker_w = await open_echo(port)  # spoke once, then stays quiet
    for reader, _ in silent:  # each closed by the activator, without a byte
        assert await asyncio.wait_for(reader.read(), 10) == b""
    await eventually(lambda: run.metric("activator_client_idle_closes_total", "echo") == 20, what="20 counted")
    assert run.act.services["echo"].open_connections == 1
    await asyncio.sleep(1.2)  # longer than client_silent_timeout: the talker is not affected
    talker_w.write(b"again")
    await talker_w.drain()
    assert await asyncio.wait_for(talker_r.readexactly(5), 10) == b"again"
    for _, writer in silent:
        writer.close()
    talker_w.close()
