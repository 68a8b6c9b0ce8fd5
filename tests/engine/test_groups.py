"""Group activation (depends_on, issue 17 item 8): a dependency is woken with its dependant, reached from it by name,
kept while the dependant has an instance, and reaped with it.

The dependant is an HTTP app whose request needs its database: a CGI that asks the dependency (the echo server,
standing in for a database) over TCP by the dependency's name, as a Compose app asks `db:PORT`.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ECHO, HTTPD, echo, eventually, free_port, http_get

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

GATEWAY = "10.89.0.1"  # the default subnet's bridge address: where a dependant reaches its dependency


def _cgi(tmp_path: Path, db_port: int) -> Path:
    d = tmp_path / "cgi"
    d.mkdir()
    (d / "db").write_text("#!/bin/sh\necho 'Content-Type: text/plain'\necho\n"
                          f"echo \"asked-$QUERY_STRING\" | nc -w 3 db {db_port} || echo 'no answer from db'\n")
    (d / "db").chmod(0o755)
    return d


def _services(tmp_path: Path, web_idle: str, db_idle: str) -> tuple[dict[str, Any], int]:
    db_port = free_port()
    web = HTTPD | {"depends_on": ["db"], "idle_timeout": web_idle,
                   "volumes": [f"{_cgi(tmp_path, db_port)}:/www/cgi-bin:ro"]}
    db = ECHO | {"listen": f"{GATEWAY}:{db_port}", "idle_timeout": db_idle}
    return {"web": web, "db": db}, db_port


def _body(reply: bytes) -> str:
    assert b"200 OK" in reply, reply
    return reply.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1].decode().strip()


async def test_the_first_request_that_needs_the_database_gets_its_answer(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services, _ = _services(tmp_path, web_idle="1m", db_idle="1m")
    run = await start(services)
    web, db = run.act.services["web"], run.act.services["db"]
    assert not web.instances and not db.instances  # nothing runs before the first client
    assert _body(await http_get(run.port("web"), "/cgi-bin/db?first")) == "asked-first"
    assert run.metric("activator_restores_total", "web") == 1
    assert run.metric("activator_restores_total", "db") == 1
    (st,) = [s for s in run.act.status()["services"] if s["name"] == "db"]
    assert st["kept_for"] == ["web"]
    (st,) = [s for s in run.act.status()["services"] if s["name"] == "web"]
    assert st["depends_on"] == ["db"]


async def test_a_dependency_is_woken_with_its_dependant(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services, _ = _services(tmp_path, web_idle="1m", db_idle="1m")
    run = await start(services)
    db = run.act.services["db"]
    # A request that does not touch the database still wakes it: the next one will not wait for its restore.
    assert b"200 OK" in await http_get(run.port("web"), "/")
    await eventually(lambda: db.instances, what="db restored with web")
    assert run.metric("activator_restores_total", "db") == 1


async def test_kept_while_the_dependant_lives_and_reaped_with_it(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    services, _ = _services(tmp_path, web_idle="1500ms", db_idle="200ms")
    services["lone"] = ECHO | {"idle_timeout": "200ms"}  # control: the same idle timeout, nobody depends on it
    run = await start(services)
    web, db, lone = run.act.services["web"], run.act.services["db"], run.act.services["lone"]
    assert _body(await http_get(run.port("web"), "/cgi-bin/db?x")) == "asked-x"
    assert await echo(run.port("lone"), b"hi") == b"hi"
    await eventually(lambda: not lone.instances, what="the control reaped after its 200ms")
    assert db.instances and db.held() == ["web"]  # idle far longer than its 200ms, but web lives
    await eventually(lambda: not web.instances, timeout=10, what="web reaped after 1.5s idle")
    await eventually(lambda: not db.instances, timeout=2, what="db reaped with web")
    assert run.metric("activator_idle_reaps_total", "db") == 1
    # And woken together again on the next request.
    assert _body(await http_get(run.port("web"), "/cgi-bin/db?again")) == "asked-again"
    assert run.metric("activator_restores_total", "db") == 2


async def test_a_dependency_keeps_serving_its_own_clients(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The dependency's own listener still serves the host (positive control), and a dependant with no
    instance holds nothing."""
    services, db_port = _services(tmp_path, web_idle="1m", db_idle="300ms")
    run = await start(services)
    db = run.act.services["db"]
    reader, writer = await asyncio.open_connection(GATEWAY, db_port)
    writer.write(b"direct")
    assert await reader.readexactly(6) == b"direct"
    writer.close()
    assert db.held() == []
    await eventually(lambda: not db.instances, what="db reaped on its own: no dependant runs")
