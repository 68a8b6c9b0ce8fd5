"""One service whose checkpoint cannot be built does not stop the others: it refuses its connections
(counted), `status` and the log say why, READY=1 is still sent, and it starts serving once a retry succeeds."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from tests.conftest import BUSYBOX, ECHO, write_config
from tests.daemonproc import ACTIVATOR, NotifyListener, daemon, echo_once, free_port, stop

pytestmark = pytest.mark.engine

GHOST = "activator-test/appears-later:1"


def refused_with_503(port: int) -> str:
    """What a client of the service without a checkpoint gets (refuse_with: http-503)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
        c.settimeout(10)
        reply = b""
        while chunk := c.recv(4096):
            reply += chunk
    return reply.decode()


def test_a_service_without_checkpoint_does_not_stop_the_others(tmp_path: Path) -> None:
    subprocess.run(["docker", "rmi", "-f", GHOST], capture_output=True)
    good, ghost, slow = free_port(), free_port(), free_port()
    cfg = write_config(tmp_path, {
        "good": ECHO | {"listen": f"127.0.0.1:{good}"},
        "ghost": ECHO | {"listen": f"127.0.0.1:{ghost}", "image": GHOST, "backoff": {"initial": "300ms", "max": "1s"},
                         "refuse_with": "http-503"},
        # a template that takes 60 s to listen: READY=1 and the other services do not wait for it
        "slow": ECHO | {"listen": f"127.0.0.1:{slow}", "command": ["sh", "-c", "sleep 60; exec echo-server 9000"],
                        "readiness": {"timeout": "2m"}},
    })
    notify = NotifyListener(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    log = tmp_path / "activator.log"
    try:
        started = time.monotonic()
        with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log, env=env, ready_lines=1) as proc:
            assert time.monotonic() - started < 50, "READY waited for the slow service's template"
            assert echo_once(good, b"served") == b"served"
            reply = refused_with_503(ghost)
            assert reply.startswith("HTTP/1.1 503 Service Unavailable\r\n") and "\r\nRetry-After: " in reply
            assert "no-checkpoint" in reply and "docker" not in reply  # the reason, not the log's details
            text = log.read_text()
            lines = [ln for ln in text.splitlines() if "service=ghost not serving: no checkpoint" in ln]
            assert lines and f"image '{GHOST}' is not in the local Docker engine" in lines[0]
            ready = next(ln for ln in text.splitlines() if "ready: " in ln)
            assert "good serving on" in ready and "ghost NOT serving on" in ready
            assert "slow on 127.0.0.1:" in ready and "checkpoint being built" in ready
            st = json.loads(subprocess.run([*ACTIVATOR, "status", "-c", str(cfg), "--json"], capture_output=True,
                                           text=True, timeout=30).stdout)
            by_name = {s["name"]: s for s in st["services"]}
            assert "docker pull" in by_name["ghost"]["checkpoint_problem"] and by_name["good"]["checkpoint"]
            human = subprocess.run([*ACTIVATOR, "status", "-c", str(cfg)], capture_output=True, text=True).stdout
            assert "NO CHECKPOINT" in human
            # The image turns up (built, pulled): the next retry builds it and the service serves.
            subprocess.run(["docker", "tag", BUSYBOX, GHOST], check=True)
            deadline = time.monotonic() + 60
            while echo_once(ghost, b"here now", timeout=30) != b"here now":
                assert time.monotonic() < deadline, "the ghost service never came up"
                time.sleep(0.2)
            assert stop(proc) == 0
        tally = [ln for ln in log.read_text().splitlines() if "service=ghost connections closed by admission" in ln]
        assert tally and "1 no-checkpoint" in tally[0] and "not serving: no checkpoint" in tally[0]  # and why
    finally:
        notify.close()
        subprocess.run(["docker", "rmi", "-f", GHOST], capture_output=True)
    assert "READY=1" in notify.messages
    status = [m for m in notify.messages if m.startswith("STATUS=serving")]
    assert status and "without a checkpoint (retrying): ghost" in status[0]
