"""One service whose checkpoint cannot be built does not stop the others: it refuses its connections
(counted), `status` and the log say why, READY=1 is still sent, and it starts serving once a retry succeeds."""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest

from .conftest import BUSYBOX, ECHO, write_config
from .daemonproc import ACTIVATOR, NotifyListener, daemon, echo_once, free_port, stop

pytestmark = pytest.mark.engine

GHOST = "activator-test/appears-later:1"


def closed_at_once(port: int) -> bool:
    try:
        return echo_once(port, b"anyone?", timeout=10) == b""
    except ConnectionResetError:
        return True


def test_a_service_without_checkpoint_does_not_stop_the_others(tmp_path: Path) -> None:
    subprocess.run(["docker", "rmi", "-f", GHOST], capture_output=True)
    good, ghost = free_port(), free_port()
    cfg = write_config(tmp_path, {
        "good": ECHO | {"listen": f"127.0.0.1:{good}"},
        "ghost": ECHO | {"listen": f"127.0.0.1:{ghost}", "image": GHOST, "backoff": {"initial": "300ms", "max": "1s"}},
    })
    notify = NotifyListener(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"))
    log = tmp_path / "activator.log"
    try:
        with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log, env=env, ready_lines=2) as proc:
            assert echo_once(good, b"served") == b"served"
            assert closed_at_once(ghost)
            text = log.read_text()
            lines = [ln for ln in text.splitlines() if "service=ghost has no checkpoint" in ln]
            assert lines and f"image '{GHOST}' is not in the local Docker engine" in lines[0]
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
        assert tally and "1 backoff" in tally[0] and "has no checkpoint" in tally[0]  # counted, and says why
    finally:
        notify.close()
        subprocess.run(["docker", "rmi", "-f", GHOST], capture_output=True)
    assert "READY=1" in notify.messages
    status = [m for m in notify.messages if m.startswith("STATUS=serving")]
    assert status and "without a checkpoint (retrying): ghost" in status[0]
