"""Idle policies (issue 22 item 3) against real restored instances: idle_cpu_below keeps an app that is still
working on its own, pre_stop reaches the app before its stop signal (and a hostile or hung endpoint only delays
its own instance's stop, by at most its timeout), keep_alive_schedule starts an instance ahead of any client."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from activator.runtime import applog
from activator.statedir import StateDir
from tests.conftest import HTTPD, eventually, http_get

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]


def cgi_httpd(scripts: dict[str, str]) -> dict[str, Any]:
    """busybox httpd with these CGI scripts (name -> shell body) written into /www/cgi-bin at start; what they
    print to stderr lands in the instance's output log."""
    setup = "".join(f"printf '%s\\n' '#!/bin/sh' {_quote(body)} > /www/cgi-bin/{name} && "
                    f"chmod +x /www/cgi-bin/{name} && " for name, body in scripts.items())
    return HTTPD | {"command": ["sh", "-c", setup + "exec httpd -f -p 8080 -h /www"]}


def _quote(text: str) -> str:
    return "'" + text.replace("'", "'\\''") + "'"


OK = 'printf "Content-Type: text/plain\\r\\n\\r\\nok\\n"'


def kept_output(state: Path, service: str) -> str:
    """What the service's reaped instances wrote (kept by applog)."""
    return "".join(p.read_text(errors="replace") for p in applog.kept(StateDir(state).logs, service))


async def test_an_app_still_using_cpu_is_not_reaped_until_it_is_quiet(start) -> None:  # type: ignore[no-untyped-def]
    # /cgi-bin/burn starts 2-3 s of CPU in the background and answers at once: no connection stays open.
    burn = ('(end=$(($(date +%s)+3)); while [ $(date +%s) -lt $end ]; do :; done) >/dev/null 2>&1 </dev/null &\n'
            + OK)
    run = await start({
        "busy": cgi_httpd({"burn": burn}) | {"idle_timeout": "1s", "idle_cpu_below": "20%"},
        "plain": cgi_httpd({"burn": burn}) | {"idle_timeout": "1s"},  # the control: connections alone decide
    })
    t0 = time.monotonic()
    for name in ("busy", "plain"):
        assert b"ok" in await http_get(run.port(name), "/cgi-bin/burn")
    busy, plain = run.act.services["busy"], run.act.services["plain"]
    await eventually(lambda: not plain.instances, timeout=10, what="the control reaped after its idle_timeout")
    assert busy.instances, "reaped while its app was still burning CPU"
    assert time.monotonic() - t0 < 3  # the control went while the burn ran
    await eventually(lambda: not busy.instances, timeout=15, what="the busy one reaped once quiet")
    # The burn ends on a whole second of `date +%s`: 2 to 3 s after it began. Then a whole quiet window (1 s).
    assert time.monotonic() - t0 >= 2 + 1 - 0.2
    assert run.metric("activator_idle_cpu_busy_total", "busy") >= 1
    assert run.metric("activator_idle_cpu_busy_total", "plain") == 0


async def test_pre_stop_reaches_the_app_before_its_stop_signal(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    flush = 'echo "pre_stop $REQUEST_METHOD $REQUEST_URI" >&2\n' + OK
    run = await start({"web": cgi_httpd({"flush": flush}) | {
        "idle_timeout": "300ms", "pre_stop": {"http_path": "/cgi-bin/flush?why=reap", "method": "POST"}}})
    svc = run.act.services["web"]
    for _ in range(2):  # two wakes, two reaps: each instance is asked once
        assert b"hello" in await http_get(run.port("web"))
        await eventually(lambda: svc.instances, timeout=10, what="an instance")
        await eventually(lambda: not svc.instances and not svc._releasing, timeout=15, what="the reap")
    await eventually(lambda: kept_output(tmp_path / "state", "web").count("pre_stop POST") == 2, timeout=10,
                     what="both instances' pre_stop requests in their output")
    assert "/cgi-bin/flush?why=reap" in kept_output(tmp_path / "state", "web")
    assert run.metric("activator_pre_stop_total", "web", result="ok") == 2


async def test_a_hung_or_failing_pre_stop_delays_only_its_own_stop(start) -> None:  # type: ignore[no-untyped-def]
    """The image's endpoint is untrusted: one that never answers costs its own instance the pre_stop timeout,
    one that answers 500 is counted; both instances are still stopped, and the daemon serves on."""
    run = await start({
        "hung": cgi_httpd({"flush": "sleep 60"}) | {
            "idle_timeout": "200ms", "pre_stop": {"http_path": "/cgi-bin/flush", "timeout": "1s"}},
        "failing": HTTPD | {"idle_timeout": "200ms", "pre_stop": {"http_path": "/no-such-page", "method": "GET"}},
    })
    t0 = time.monotonic()
    for name in ("hung", "failing"):
        assert b"hello" in await http_get(run.port(name))
    hung, failing = run.act.services["hung"], run.act.services["failing"]
    await eventually(lambda: not failing.instances and not failing._releasing, timeout=10, what="failing stopped")
    assert run.metric("activator_pre_stop_total", "failing", result="failed") == 1
    await eventually(lambda: not hung.instances and not hung._releasing, timeout=15, what="hung stopped")
    assert time.monotonic() - t0 >= 1.0  # it was given its timeout
    assert run.metric("activator_pre_stop_total", "hung", result="timeout") == 1
    # the positive control: both still serve
    for name in ("hung", "failing"):
        assert b"hello" in await http_get(run.port(name))


async def test_a_keep_alive_window_starts_an_instance_ahead_of_any_client(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({
        "office": HTTPD | {"idle_timeout": "200ms", "keep_alive_schedule": ["00:00-24:00"]},  # now, whenever now is
        "never": HTTPD | {"idle_timeout": "200ms", "keep_alive_schedule": []},  # the control
    })
    office = run.act.services["office"]
    await eventually(lambda: office.instances, timeout=20, what="an instance started by the schedule")
    assert office.kept_warm and run.metric("activator_kept_warm", "office") == 1
    assert not run.act.services["never"].instances and run.metric("activator_kept_warm", "never") == 0
    await asyncio.sleep(1)  # many idle timeouts: kept
    (inst,) = office.instances
    assert b"hello" in await http_get(run.port("office"))
    assert office.instances == [inst] and office.started_total == 1  # served warm, no restore on the way
    office.keep_warm(False)  # the window's end, as the watcher says it at its edge
    await eventually(lambda: not office.instances, timeout=10, what="the reap after the window")
