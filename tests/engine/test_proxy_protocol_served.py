"""The PROXY header reaches a real app through a restored instance (the encoding: tests/unit/test_proxy_protocol.py)."""

from __future__ import annotations

import asyncio

import pytest

from activator.core import proxy_protocol
from tests.conftest import ECHO


@pytest.mark.engine
@pytest.mark.asyncio
@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_proxy_protocol_header_reaches_the_app(start, version: str) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"proxy_protocol": version}})
    port = run.port("echo")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client_port = writer.get_extra_info("sockname")[1]
    writer.write(b"payload")
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    # The echo server sends back exactly what it received: the header, then our bytes.
    assert got == proxy_protocol.header(version, ("127.0.0.1", client_port), ("127.0.0.1", port)) + b"payload"
