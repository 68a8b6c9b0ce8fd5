"""`make install` puts activator in its own venv, without dev tools, with units pointing at it, and the installed
daemon really serves; `make uninstall` removes it and keeps the configuration."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from .conftest import ECHO, write_config
from .daemonproc import daemon, echo_once, free_port, stop

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[1]


def test_install_serve_uninstall(tmp_path: Path) -> None:
    where = {"PREFIX": str(tmp_path / "opt"), "SYSCONFDIR": str(tmp_path / "etc"), "UNITDIR": str(tmp_path / "units")}
    env = os.environ | where
    done = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "install"], env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    venv = tmp_path / "opt" / "venv"
    installed = subprocess.run([str(venv / "bin" / "pip"), "list", "--format=freeze"], capture_output=True, text=True,
                               timeout=120).stdout.lower()
    assert "activator==" in installed and "pycriu==" in installed
    assert not [tool for tool in ("pytest", "mypy", "ruff", "hypothesis") if f"\n{tool}==" in f"\n{installed}"]
    unit = (tmp_path / "units" / "activator.service").read_text()
    assert f"ExecStart={venv}/bin/activator run -c {tmp_path}/etc/config.yaml" in unit
    assert "StateDirectory=activator" in unit and "ExecReload=" in unit
    config = tmp_path / "etc" / "config.yaml"
    assert config.stat().st_mode & 0o077 == 0  # it may hold secrets
    assert subprocess.run([str(venv / "bin" / "activator"), "validate", str(config)], capture_output=True,
                          timeout=60).returncode == 0
    if subprocess.run(["which", "systemd-analyze"], capture_output=True).returncode == 0:
        check = subprocess.run(["systemd-analyze", "verify", "--man=no", *map(str, (tmp_path / "units").iterdir())],
                               capture_output=True, text=True, env=env | {"SYSTEMD_LOG_LEVEL": "warning"}, timeout=60)
        assert check.stdout.strip() == "" and check.stderr.strip() == "", check.stderr

    port = free_port()  # the installed daemon, not this checkout's, restores and serves
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}})
    with daemon([str(venv / "bin" / "activator"), "run", "-c", str(cfg)], tmp_path / "activator.log") as proc:
        assert echo_once(port, b"installed") == b"installed"
        assert stop(proc) == 0

    done = subprocess.run(["bash", str(ROOT / "scripts" / "install.sh"), "uninstall"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert not (tmp_path / "opt").exists() and not list((tmp_path / "units").iterdir())
    assert config.exists()  # the configuration is the operator's
