"""Whose output a kept log file holds (issue 30 item 7), with a real daemon: services `a` and `a-tpl` side by
side. Service a-tpl's instances are named a-tpl-XXXXXXXX, the shape of service a's template's name; by its name
alone a-tpl's output was filed under `a`. Each app prints its own words; after a reap, `activator logs` shows
each service only its own (and `a`'s template output stays `a`'s: the control)."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import HTTPD, http_get, write_config
from tests.daemonproc import ACTIVATOR, daemon, free_port, stop

pytestmark = pytest.mark.engine
#: the header of an instance of a-tpl and of a's template alike: the names that were confused
INSTANCE = re.compile(r"--- a-tpl-[0-9a-f]{8}: its output")


def _logs(cfg: Path, service: str) -> str:
    out = subprocess.run([*ACTIVATOR, "logs", service, "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_service_a_tpl_output_is_not_filed_under_a(tmp_path: Path) -> None:
    ports = {"a": free_port(), "a-tpl": free_port()}
    services = {name: HTTPD | {"command": ["sh", "-c", f"echo I am {name} pid $$; exec httpd -f -v -p 8080 -h /www"],
                               "listen": f"127.0.0.1:{ports[name]}", "idle_timeout": "300ms"}
                for name in ports}
    cfg = write_config(tmp_path, services)
    logs = tmp_path / "state" / "logs"
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], tmp_path / "activator.log") as proc:
        asyncio.run(http_get(ports["a-tpl"], "/"))  # an instance of a-tpl, reaped after 300 ms
        deadline = time.monotonic() + 30
        while not any("response:" in p.read_text(errors="replace") for p in logs.glob("*.output")):
            assert time.monotonic() < deadline, "a-tpl's instance output was not kept at reap"
            time.sleep(0.1)
        a, a_tpl = _logs(cfg, "a"), _logs(cfg, "a-tpl")
        stop(proc)
    # the instance's output (httpd -v: the request it served; only instances serve) is a-tpl's, kept at reap
    assert "response:" in a_tpl and "(running)" not in a_tpl, a_tpl
    assert "I am a-tpl" in a_tpl and "I am a pid" not in a_tpl  # a-tpl's own template too
    # a's: its template's words, under a name of the same shape as a-tpl's instances (the control)
    assert "I am a pid" in a and any(INSTANCE.match(line) for line in a.splitlines()), a
    assert "response:" not in a and "I am a-tpl" not in a, a
    assert sorted(p.name for p in logs.glob("*.output")) == ["a-tpl.output", "a.output"]
