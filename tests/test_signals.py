"""Signals as a daemon meets them: a hang-up must not kill it, a second stop request cuts the drain short, and
either way every instance is released."""

from __future__ import annotations

import signal
import socket
import time
from pathlib import Path

import pytest

from .conftest import ECHO, host_resources, write_config
from .daemonproc import ACTIVATOR, daemon, echo_once, free_port, stop

pytestmark = pytest.mark.engine


def wait_for_log(log: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"'{text}' never logged: {log.read_text()[-2000:]}"
        time.sleep(0.02)


def test_sighup_is_logged_and_ignored(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}})
    log = tmp_path / "activator.log"
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        assert echo_once(port, b"before") == b"before"
        instances = host_resources(tmp_path / "state")["runc"]
        proc.send_signal(signal.SIGHUP)  # an SSH session closing on `make demo`
        wait_for_log(log, "SIGHUP ignored")
        assert proc.poll() is None
        assert host_resources(tmp_path / "state")["runc"] == instances  # the instance still runs
        assert echo_once(port, b"after") == b"after"
        assert stop(proc) == 0
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []


def test_a_second_sigterm_cuts_the_drain_short_and_still_cleans_up(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}}, drain_timeout="10m")
    log = tmp_path / "activator.log"
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"held")
        assert client.recv(4) == b"held"
        proc.send_signal(signal.SIGTERM)
        wait_for_log(log, "draining 1 connection(s) for up to 600s")
        client.sendall(b"still")  # the drain is under way: the open connection keeps working
        assert client.recv(5) == b"still"
        assert proc.poll() is None
        proc.send_signal(signal.SIGTERM)  # the operator means it
        assert proc.wait(timeout=60) == 0  # well before the 10 minutes of drain
        assert "cutting the drain short" in log.read_text()
        client.settimeout(10)
        assert client.recv(100) == b""  # the held connection was closed, not left dangling
        client.close()
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []
