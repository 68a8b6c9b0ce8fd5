"""Every applied Compose key, seen from inside a restored instance (the key table: tests/unit/test_compose_keys.py)."""

from __future__ import annotations

import asyncio
import os
import re
from pathlib import Path

import pytest
import yaml

from activator.config import compose
from activator.config.model import load_config

PROBE = r"""#!/bin/sh
echo "Content-Type: text/plain"
echo
echo "hostname: $(hostname)"
echo "hosts-db: $(grep -c 'db.example' /etc/hosts)"
echo "hosts-cache: $(grep -w cache /etc/hosts | cut -f1)"
echo "nofile: $(ulimit -n) $(ulimit -Hn)"
if touch /root-write 2>/dev/null; then echo "root: writable"; else echo "root: read-only"; fi
if touch /scratch/x 2>/dev/null; then echo "scratch: writable"; else echo "scratch: read-only"; fi
echo "scratch-opts: $(grep ' /scratch ' /proc/mounts | cut -d' ' -f4)"
echo "healthy: $(cat /scratch/healthy 2>/dev/null || echo missing)"
grep -E '^(CapEff|NoNewPrivs|Seccomp):' /proc/self/status
echo "env: ${FROM_SHELL:-unset} ${UNSET_VAR:-unset} ${FROM_FILE:-unset}"
echo "uid: $(id -u)"
"""


def _cgroup_value(pid: int, controller: str, v1: str, v2: str) -> str:
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, names, path = line.split(":", 2)
        if controller in names.split(","):
            return (Path("/sys/fs/cgroup") / controller / path.lstrip("/") / v1).read_text().strip()
        if names == "" and (Path("/sys/fs/cgroup") / path.lstrip("/") / v2).exists():
            return (Path("/sys/fs/cgroup") / path.lstrip("/") / v2).read_text().strip()
    raise AssertionError(f"no {controller} cgroup for {pid}")


@pytest.mark.engine
@pytest.mark.asyncio
async def test_every_applied_key_is_seen_inside_a_restored_instance(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    from activator.daemon.server import Activator
    from tests.conftest import BUSYBOX, free_port, http_get

    cgi = tmp_path / "cgi"
    cgi.mkdir()
    (cgi / "probe").write_text(PROBE)
    os.chmod(cgi / "probe", 0o755)
    (tmp_path / "web.env").write_text("FROM_FILE=file\n")
    monkeypatch.setenv("FROM_SHELL", "shell")
    monkeypatch.delenv("UNSET_VAR", raising=False)
    port, cache_port = free_port(), free_port()
    web = {
        "image": BUSYBOX, "command": "httpd -f -p 8080 -h /www",
        "ports": [f"127.0.0.1:{port}:8080", f"127.0.0.2:{port}:8080"],
        "environment": ["FROM_SHELL", "UNSET_VAR"], "env_file": "web.env",
        "volumes": ["./cgi:/www/cgi-bin:ro"], "hostname": "probe-host", "read_only": True,
        "tmpfs": ["/scratch:size=1m,mode=1777"], "ulimits": {"nofile": {"soft": 200, "hard": 300}},
        "cap_drop": ["ALL"], "mem_limit": "48m", "cpus": 0.5, "pids_limit": 40,
        "extra_hosts": ["db.example:10.1.2.3"], "security_opt": ["no-new-privileges:true"],
        "stop_signal": "SIGINT", "stop_grace_period": "3s", "depends_on": ["cache"],
        "healthcheck": {"test": ["CMD-SHELL", "echo yes > /scratch/healthy"], "interval": "1s"},
        "restart": "always", "x-activator": {"idle_timeout": "1m"},
    }
    cache = {"image": BUSYBOX, "command": "echo-server 9000", "ports": [f"10.89.0.1:{cache_port}:9000"],
             "x-activator": {}}
    doc = {"x-activator": {"settings": {"state_dir": str(tmp_path / "state"), "metrics": None}},
           "services": {"web": web, "cache": cache}}
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(doc))
    cfg = load_config(tmp_path / "compose.yaml")
    assert cfg.notes == ("services.web.restart: ignored: " + compose.IGNORED["restart"],)
    act = Activator(cfg)
    try:
        await act.startup()
        reply = await http_get(port, "/cgi-bin/probe")
        assert b"200 OK" in reply, reply
        got = dict(re.findall(r"^([\w-]+):\s*(.*)$", reply.decode(), re.M))
        assert act.metrics.registry.get_sample_value("activator_restores_total", {"service": "web"}) == 1
        assert got["hostname"] == "probe-host" and got["hosts-db"] == "1"
        assert got["hosts-cache"] == "10.89.0.1"  # the dependency, by name, at the gateway
        assert got["nofile"] == "200 300"
        assert got["root"] == "read-only" and got["scratch"] == "writable"
        assert {"rw", "nosuid", "nodev", "noexec"} <= set(got["scratch-opts"].split(","))
        assert got["healthy"] == "yes"  # the healthcheck ran in the template; its tmpfs came back with the dump
        assert int(got["CapEff"], 16) == 0 and got["NoNewPrivs"] == "1" and got["Seccomp"] == "2"
        assert got["env"] == "shell unset file"
        (inst,) = act.services["web"].instances
        pid = await inst.sandbox.pid()
        assert pid is not None
        assert int(_cgroup_value(pid, "memory", "memory.limit_in_bytes", "memory.max")) == 48 << 20
        assert _cgroup_value(pid, "pids", "pids.max", "pids.max") == "40"
        assert _cgroup_value(pid, "cpu", "cpu.cfs_quota_us", "cpu.max").split()[0] == "50000"
        # both published addresses of the one app port serve
        reader, writer = await asyncio.open_connection("127.0.0.2", port)
        writer.write(b"GET /cgi-bin/probe HTTP/1.0\r\n\r\n")
        assert b"hostname: probe-host" in await asyncio.wait_for(reader.read(), 10)
        writer.close()
    finally:
        await act.shutdown()
