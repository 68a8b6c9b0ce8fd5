"""The activator's own limits are its own: running short of file descriptors turns clients away (counted,
reason=resources) and never counts against a healthy instance or backs the service off.

These pin the userspace path (network: none): connections steered by the kernel cost the daemon no descriptor
at all, so on the kernel path there is nothing to run short of."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import resource
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import ECHO, echo, free_port, write_config
from tests.daemonproc import ACTIVATOR, daemon, echo_once, stop

pytestmark = pytest.mark.engine


def test_a_low_descriptor_limit_rejects_with_reason_resources(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}", "max_instances": 1,
                                                  "network": "none"}})

    def limit() -> None:  # the daemon's hard limit: it cannot raise itself past this
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], tmp_path / "activator.log", preexec=limit) as proc:
        assert echo_once(port, b"warm") == b"warm"
        st = json.loads(subprocess.run([*ACTIVATOR, "status", "-c", str(cfg), "--json"], capture_output=True,
                                       text=True, timeout=30).stdout)
        budget = st["connection_budget"]
        assert 16 <= budget < 128 and st["services"][0]["max_connections"] == budget
        held: list[socket.socket] = []
        try:
            for _ in range(budget + 20):
                c = socket.create_connection(("127.0.0.1", port), timeout=10)
                c.sendall(b"x")
                held.append(c)
            served = sum(1 for c in held if _answered(c))
            assert served == budget  # exactly what the budget allows; the rest were closed at once
        finally:
            for c in held:
                c.close()
        deadline = time.monotonic() + 30
        while _scrape_status(cfg)["services"][0]["open_connections"]:
            assert time.monotonic() < deadline, "the closed connections were never counted out"
            time.sleep(0.05)
        assert echo_once(port, b"still healthy") == b"still healthy"
        text = _scrape_status(cfg)
        assert text["services"][0]["instances"][0]["served"] >= budget  # the same instance throughout
        assert stop(proc) == 0
    log = (tmp_path / "activator.log").read_text()
    assert "reason=resources" in log or "resources" in log
    assert "removed" not in log and "back off" not in log


def _answered(c: socket.socket) -> bool:
    c.settimeout(10)
    try:
        return c.recv(1) == b"x"
    except OSError:
        return False


def _scrape_status(cfg: Path) -> dict[str, Any]:
    out = subprocess.run([*ACTIVATOR, "status", "-c", str(cfg), "--json"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    result: dict[str, object] = json.loads(out.stdout)
    return result


CLIENTS = """
import socket, sys
port, n = int(sys.argv[1]), int(sys.argv[2])
for _ in range(n):
    c = socket.create_connection(("127.0.0.1", port), timeout=10)
    c.sendall(b"x")
    try:
        print(repr(c.recv(1)))
    except OSError as e:
        print(type(e).__name__)
    c.close()
"""


@pytest.mark.asyncio
async def test_emfile_on_the_backend_socket_is_ours_not_the_apps(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"wake_on": "connect", "network": "none"}})
    port = run.port("echo")
    assert await echo(port, b"warm") == b"warm"
    (inst,) = run.act.services["echo"].instances
    clients = await asyncio.create_subprocess_exec(sys.executable, "-c", CLIENTS, str(port), "3",
                                                   stdout=subprocess.PIPE)
    # Eat every free descriptor of this process (the daemon's) but one: the accepted client gets it, and none
    # is left for the backend socket. The clients run in their own process, with their own descriptors.
    eaten: list[int] = []
    try:
        with contextlib.suppress(OSError):
            while True:
                eaten.append(os.open("/dev/null", os.O_RDONLY))
        os.close(eaten.pop())
        out, _ = await asyncio.wait_for(clients.communicate(), 60)
    finally:
        for fd in eaten:
            os.close(fd)
    assert out.decode().split() == ["b''"] * 3  # each closed without an answer
    assert run.metric("activator_rejected_connections_total", "echo", reason="resources") == 3
    assert run.metric("activator_instance_failures_total", "echo") == 0
    assert run.metric("activator_start_failures_total", "echo") == 0
    assert run.act.services["echo"].instances == [inst] and not inst.track.stopping
    assert await echo(port, b"fine again") == b"fine again"
    assert run.act.services["echo"].instances == [inst]
