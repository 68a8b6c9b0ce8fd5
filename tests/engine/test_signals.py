"""Signals as a daemon meets them: a hang-up reloads (an unchanged file changes nothing), a second stop request
cuts the drain short, and either way every instance is released."""

from __future__ import annotations

import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import ECHO, host_resources, write_config
from tests.daemonproc import ACTIVATOR, daemon, echo_once, free_port, stop

pytestmark = pytest.mark.engine


def wait_for_log(log: Path, text: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert time.monotonic() < deadline, f"'{text}' never logged: {log.read_text()[-2000:]}"
        time.sleep(0.02)


def test_sighup_reloads_and_an_unchanged_file_touches_nothing(tmp_path: Path) -> None:
    port, port2 = free_port(), free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}})
    log = tmp_path / "activator.log"
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        assert echo_once(port, b"before") == b"before"
        instances = host_resources(tmp_path / "state")["runc"]
        proc.send_signal(signal.SIGHUP)  # an SSH session closing on `make demo`: the same file, nothing changes
        wait_for_log(log, "keep echo untouched")
        assert proc.poll() is None
        assert host_resources(tmp_path / "state")["runc"] == instances  # the instance still runs
        assert echo_once(port, b"after") == b"after"
        # `systemctl reload` after an edit: a service added
        write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"},
                                "more": ECHO | {"listen": f"127.0.0.1:{port2}"}})
        proc.send_signal(signal.SIGHUP)
        wait_for_log(log, "add more")
        assert echo_once(port2, b"added") == b"added"
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


def test_validate_shows_the_plan_and_reload_applies_it_from_the_command_line(tmp_path: Path) -> None:
    port, port2 = free_port(), free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}, "other": ECHO})
    log = tmp_path / "activator.log"
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        assert echo_once(port, b"one") == b"one"
        write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"},
                      "more": ECHO | {"listen": f"127.0.0.1:{port2}"}})
        out = subprocess.run([*ACTIVATOR, "validate", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        # after the ok line and each service's addresses (validate prints them since issue 31), the plan
        plan = [line for line in out.stdout.splitlines() if line.startswith("a reload of the running activator")]
        assert plan == [f"a reload of the running activator would: add more (on 127.0.0.1:{port2}); remove other "
                        "(its connections drain first); keep echo untouched"], out.stdout
        out = subprocess.run([*ACTIVATOR, "reload", "-c", str(cfg)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith(f"reloaded {cfg}: add more")
        assert echo_once(port2, b"two") == b"two"
        # Issue 31 item 4: another file (same state dir, so the same daemon) is not what the daemon re-reads
        other = tmp_path / "copy.yaml"
        other.write_text(cfg.read_text())
        out = subprocess.run([*ACTIVATOR, "reload", "-c", str(other)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and out.stdout == "" and out.stderr.count("\n") == 1, out.stderr
        assert f"reloads only its own file {cfg}, not {other}" in out.stderr
        cfg.write_text(cfg.read_text() + "bogus: 1\n")  # the daemon is asked all the same: it refuses and logs it
        out = subprocess.run([*ACTIVATOR, "reload", "-c", str(cfg)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 2 and out.stdout == "" and out.stderr.count("\n") == 1
        assert "bogus: unknown key" in out.stderr and "Traceback" not in out.stderr
        write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"},  # the daemon refuses this one
                                "more": ECHO | {"listen": f"127.0.0.1:{port2}"}}, metrics=f"127.0.0.1:{free_port()}")
        out = subprocess.run([*ACTIVATOR, "reload", "-c", str(cfg)], capture_output=True, text=True, timeout=120)
        assert out.returncode == 1 and out.stdout == "" and out.stderr.count("\n") == 1
        assert "reload refused, the running configuration stays" in out.stderr
        assert "settings.metrics changed" in out.stderr and "restart" in out.stderr
        wait_for_log(log, "reload refused")
        assert echo_once(port, b"three") == b"three"
        assert stop(proc) == 0
