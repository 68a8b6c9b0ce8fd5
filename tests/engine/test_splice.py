"""The splice path under the load that lost requests: thousands of concurrent clients, half of them sending
their bytes and closing their write side at once, against a warm and a cold service, without and with a PROXY
header (and every client trying to spoof one). Nothing may be lost, reordered, or let in ahead of the header,
and no task may die."""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.conftest import ECHO
from tests.conftest import loadgen as load

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]


@pytest.mark.parametrize("header", [None, "v1", "v2"])
async def test_thousands_of_clients_early_fin_nothing_lost_or_spoofed(start, caplog, header: str | None) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.WARNING)
    run = await start({"echo": ECHO | {"proxy_protocol": header, "max_instances": 2, "target_connections": 64}})
    port = run.port("echo")
    args = ["--connections", "2000", "--concurrency", "100", "--fin-every", "2", "--spoof"]
    if header:
        args += ["--header-of", header]
    # The first batch meets a cold service (held during the restore); the rest a warm one.
    result = await load(port, *args)
    assert result["ok"] == 2000, {k: v for k, v in result.items() if k != "ok" and v}
    assert run.metric("activator_connection_errors_total", "echo") == 0
    assert not [r for r in caplog.records if r.name.startswith("activator") and r.levelno >= logging.ERROR]


async def test_early_fin_on_first_connection_reaches_the_app_after_the_bytes(start) -> None:  # type: ignore[no-untyped-def]
    """One client, cold service: bytes and FIN arrive long before the backend exists."""
    run = await start({"echo": ECHO | {"proxy_protocol": "v1"}})
    port = run.port("echo")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"PROXY TCP4 6.6.6.6 6.6.6.6 1 2\r\n" + b"x" * 100_000)
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 30)
    me = writer.get_extra_info("sockname")[:2]
    writer.close()
    assert got.startswith(f"PROXY TCP4 127.0.0.1 127.0.0.1 {me[1]} {port}\r\n".encode())
    assert got.endswith(b"x" * 100_000) and got.count(b"PROXY") == 2
