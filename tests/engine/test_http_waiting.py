"""HTTP-aware waiting (issue 22 item 6) through real restores: a browser's page load during a slow start gets the
'starting' page and reloads into the app; an API client waits and gets the app's answer; a refused client of an
`http: true` service gets a 503 with Retry-After; a request head that is not complete is never answered by the
activator (it is a stranger's, and may be anything)."""

from __future__ import annotations

import asyncio
import shutil
import time

import pytest

from tests.conftest import HTTPD, eventually, faulty_restore

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

BROWSER = b"GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html,application/xhtml+xml,*/*;q=0.8\r\nConnection: close\r\n\r\n"
API = b"GET / HTTP/1.1\r\nHost: x\r\nAccept: application/json\r\nConnection: close\r\n\r\n"


async def ask(port: int, request: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    got = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return got


async def test_a_browser_gets_the_starting_page_an_api_client_waits(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tools, _ = faulty_restore(tmp_path, restore_delay=2)  # a slow start, as a big JVM's cold start
    run = await start({"web": HTTPD | {"http": True, "waiting_page": "300ms"}}, **tools)
    port = run.port("web")
    t0 = time.monotonic()
    browser = asyncio.ensure_future(ask(port, BROWSER))
    api = asyncio.ensure_future(ask(port, API))
    page = await browser
    assert time.monotonic() - t0 < 1.5  # well before the restore ends
    assert page.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 1\r\n" in page, page
    assert b"http-equiv=refresh content=1" in page and b"web is starting" in page
    assert b"hello from a restored busybox httpd" in await api  # the API client waited for the app
    assert run.metric("activator_waiting_pages_total", "web") == 1
    # The reload meets the app, and now nothing waits: no page.
    assert b"hello from a restored busybox httpd" in await ask(port, BROWSER)
    assert run.metric("activator_waiting_pages_total", "web") == 1
    # A real browser-like client: curl asking for HTML, through a wake from zero again.
    svc = run.act.services["web"]
    for inst in list(svc.instances):
        svc._stop(inst)
    await eventually(lambda: not svc.instances and not svc._releasing, what="the instance gone")
    curl = shutil.which("curl")
    assert curl is not None
    proc = await asyncio.create_subprocess_exec(
        curl, "-s", "-o", "/dev/null", "-w", "%{http_code} %{header_json}", "-H", "Accept: text/html",
        f"http://127.0.0.1:{port}/", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 30)
    assert out.startswith(b"503 ") and b'"retry-after":["1"]' in out, out


async def test_an_incomplete_head_or_a_post_is_never_answered_by_the_activator(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tools, _ = faulty_restore(tmp_path, restore_delay=1.5)
    run = await start({"web": HTTPD | {"http": True, "waiting_page": "100ms"}}, **tools)
    port = run.port("web")
    # A head without its end: held as it is, then given to the app once it runs (which then gets the rest).
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html\r\n")
    await asyncio.sleep(0.5)  # past waiting_page: nothing came back
    assert not reader.at_eof() and reader._buffer == b""  # type: ignore[attr-defined]
    writer.write(b"Connection: close\r\n\r\n")
    assert b"hello from a restored busybox httpd" in await asyncio.wait_for(reader.read(), 30)
    writer.close()
    assert run.metric("activator_waiting_pages_total", "web") == 0
    # 100 page loads that close at once and 100 junk heads: the daemon serves on (the positive control).
    async def rude(payload: bytes) -> None:
        _, w = await asyncio.open_connection("127.0.0.1", port)
        w.write(payload)
        w.close()
    await asyncio.gather(*(rude(BROWSER) for _ in range(100)), *(rude(b"\x00" * 9000 + b"\r\n\r\n")
                                                                 for _ in range(100)))
    assert b"hello from a restored busybox httpd" in await ask(port, BROWSER)


async def test_a_refused_client_of_an_http_service_gets_a_503(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"web": HTTPD | {"http": True}, "raw": HTTPD})
    for name in ("web", "raw"):
        await run.act.services[name].stop_serving(1.0)  # `activator stop`: refused, reason stopped
    got = await ask(run.port("web"), API)
    assert got.startswith(b"HTTP/1.1 503 ") and b"Retry-After: " in got, got
    assert await ask(run.port("raw"), API) == b""  # the control: a raw TCP service is closed
    assert run.metric("activator_rejected_connections_total", "web", reason="stopped") == 1
