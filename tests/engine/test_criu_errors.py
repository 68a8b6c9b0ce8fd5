"""A CRIU failure is explained by CRIU's own Error lines, in the one line the user gets, with where the log is."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ECHO, faulty_restore, write_config

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


def has_cap_sys_resource() -> bool:
    bounding = next(ln.split()[1] for ln in Path("/proc/self/status").read_text().splitlines()
                    if ln.startswith("CapBnd:"))
    return bool(int(bounding, 16) >> 24 & 1)  # CAP_SYS_RESOURCE is capability 24


def test_an_app_running_as_another_user(tmp_path: Path) -> None:
    """In its own user namespace (the default) a non-root app is checkpointed and served on every host, also
    where root lacks CAP_SYS_RESOURCE (the machines this is built on), where it failed before user namespaces.
    Without one (`userns: host`) it is checkpointed only where root has that capability; elsewhere the one line
    says so and what to do, instead of runc's 'type NOTIFY'."""
    cfg = write_config(tmp_path, {"echo": ECHO | {"user": "65534:65534"},
                                  "plain": ECHO | {"user": "65534:65534", "userns": "host"}})
    out = subprocess.run([*ACTIVATOR, "checkpoint", "echo", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("echo: checkpoint built")
    out = subprocess.run([*ACTIVATOR, "checkpoint", "plain", "-c", str(cfg)], capture_output=True, text=True,
                         timeout=300)
    if has_cap_sys_resource():
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("plain: checkpoint built")
    else:
        assert out.returncode == 1
        line = out.stderr.splitlines()[-1]
        assert "Can't get rlimit" in line and "CAP_SYS_RESOURCE" in line and "remove 'userns: host'" in line
