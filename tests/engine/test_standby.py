"""Standbys against real runc and CRIU: instances restored ahead and frozen (cgroup freezer), thawed for the first
connection that needs a new instance, and replaced behind it. A frozen one really runs nothing; a thawed one is an
ordinary instance (reaped when idle); a standby is never reaped; a stopped service keeps none; nothing leaks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from activator.runtime import cgroups
from tests.conftest import ECHO, echo, eventually, host_resources, loadgen

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]


def cpu_usage_ns(name: str) -> int:
    """CPU the instance's processes have used (v1 cpuacct, or v2 cpu.stat)."""
    for cg in cgroups.paths(name):
        if (cg / "cpuacct.usage").exists():
            return int((cg / "cpuacct.usage").read_text())
        if (cg / "cpu.stat").exists():
            return int(dict(line.split() for line in (cg / "cpu.stat").read_text().splitlines())["usage_usec"]) * 1000
    raise AssertionError(f"no CPU accounting for {name}")


def frozen(name: str) -> bool:
    fz = cgroups.freezer(name)
    assert fz is not None, f"{name} has no freezer"
    return fz.frozen()


async def test_a_standby_is_frozen_thawed_for_200_first_connections_and_replaced(start) -> None:  # type: ignore[no-untyped-def]
    # A busy echo-server would use CPU if it ran: a frozen one uses none at all. The kernel path is on (bridge).
    run = await start({"echo": ECHO | {"standby": 1, "max_instances": 2, "idle_timeout": "1s",
                                       "target_connections": 1000}})
    svc = run.act.services["echo"]
    launcher = svc.launcher
    await eventually(lambda: len(launcher.standbys) == 1, timeout=30, what="the standby restored ahead")
    first = launcher.standbys[0]
    assert frozen(first.name) and not svc.instances
    used = cpu_usage_ns(first.name)
    await asyncio.sleep(0.5)
    assert cpu_usage_ns(first.name) == used, "a frozen standby used CPU"
    assert run.metric("activator_standby_instances", "echo") == 1
    assert run.metric("activator_standby_memory_bytes", "echo") > 64 << 10  # its pages are charged, and shown
    status = svc.status()
    assert status["standby"] == 1 and [s["name"] for s in status["standbys"]] == [first.name]

    # 200 first connections at once, half of them closing their write side right after sending: one standby is
    # thawed for all of them, and nothing is lost.
    result = await loadgen(run.port("echo"), "--connections", "200", "--concurrency", "200", "--fin-every", "2")
    assert result["ok"] == 200, {k: v for k, v in result.items() if k != "ok" and v}
    assert run.metric("activator_standby_thaws_total", "echo") == 1
    assert [(i.name, i.how) for i in svc.instances] == [(first.name, "standby")]
    assert not frozen(first.name)
    assert run.metric("activator_connection_errors_total", "echo") == 0

    # Replaced behind it, from the checkpoint; the thawed one is reaped when idle, the standby never is.
    await eventually(lambda: len(launcher.standbys) == 1, timeout=30, what="a new standby")
    second = launcher.standbys[0]
    assert second.name != first.name and frozen(second.name)
    await eventually(lambda: not svc.instances, timeout=15, what="the thawed instance reaped when idle")
    assert run.metric("activator_idle_reaps_total", "echo") == 1
    await asyncio.sleep(1.5)  # more than idle_timeout: still there, still frozen
    assert [s.name for s in launcher.standbys] == [second.name] and frozen(second.name)
    assert await echo(run.port("echo"), b"again") == b"again"  # and thawed in turn
    assert svc.instances[0].name == second.name
    assert run.metric("activator_restores_total", "echo") >= 2  # standbys are restores made ahead of time


async def test_a_stopped_service_keeps_no_standby_and_nothing_leaks(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"standby": 2, "max_instances": 2, "network": "none"}})
    svc = run.act.services["echo"]
    state: Path = run.config.settings.state_dir
    await eventually(lambda: len(svc.launcher.standbys) == 2, timeout=30, what="two standbys")
    names = [s.name for s in svc.launcher.standbys]
    assert all(frozen(n) for n in names)
    assert sorted(host_resources(state)["dirs"]) == sorted(names)  # the standbys are all that runs

    await svc.stop_serving(drain_timeout=1)
    assert not svc.launcher.standbys
    await eventually(lambda: not host_resources(state)["dirs"] and not host_resources(state)["procs"],
                     what="the standbys released (frozen processes killed, not left behind)")
    for name in names:
        assert not cgroups.paths(name)

    svc.start_serving()
    await eventually(lambda: len(svc.launcher.standbys) == 2, timeout=30, what="standbys again after start")
    t0 = time.monotonic()
    assert await echo(run.port("echo"), b"x") == b"x"
    assert time.monotonic() - t0 < 5
    assert svc.instances[0].how == "standby"


async def test_a_standby_whose_app_was_killed_is_not_handed_out(start) -> None:  # type: ignore[no-untyped-def]
    # The out-of-memory killer, or an operator, may kill a frozen app: the next connection must still be served
    # (by a restore), and the dead standby released.
    import os
    import signal

    run = await start({"echo": ECHO | {"standby": 1, "network": "none"}})
    svc = run.act.services["echo"]
    await eventually(lambda: len(svc.launcher.standbys) == 1, timeout=30, what="the standby")
    dead = svc.launcher.standbys[0]
    pid = dead.sandbox.pid_now()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)
    cgroups.freezer(dead.name).thaw()  # type: ignore[union-attr]  # a frozen task dies once thawed
    await eventually(lambda: dead.sandbox.pid_now() is None, what="the frozen app killed")
    assert await echo(run.port("echo"), b"still served") == b"still served"
    assert svc.instances[0].name != dead.name and svc.instances[0].how == "restore"
    await eventually(lambda: not dead.sandbox.layout.dir.exists(), what="the dead standby released")
