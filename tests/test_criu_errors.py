"""A CRIU failure is explained by CRIU's own Error lines, in the one line the user gets, with where the log is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ECHO, faulty_restore, write_config

pytestmark = pytest.mark.engine

ACTIVATOR = [sys.executable, "-m", "activator"]


def test_a_failed_dump_names_criu_s_error(tmp_path: Path) -> None:
    tools, attempts = faulty_restore(tmp_path, restore_fails=True, phase="pre-dump")
    cfg = write_config(tmp_path, {"echo": ECHO}, **tools)
    out = subprocess.run([*ACTIVATOR, "checkpoint", "echo", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=300)
    errors = [ln for ln in out.stderr.splitlines() if ln.startswith("activator: error:")]
    assert out.returncode == 1 and len(errors) == 1 and out.stderr.splitlines()[-1] == errors[0], out.stderr
    line = errors[0]
    assert line.startswith("activator: error: service 'echo': building its checkpoint failed: runc checkpoint")
    assert "; CRIU: " in line and "restore-fault exited with" in line  # CRIU's Error lines, not runc's summary
    assert "RLIMIT_NOFILE" not in line  # the line CRIU logs on every run here is not the cause
    assert f"logs in {tmp_path / 'state' / 'logs'}/echo-*" in line
    assert (tmp_path / "state" / "logs" / "echo-dump.log").exists()
    assert attempts.read_text().split() == ["x"]
