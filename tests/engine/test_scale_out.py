"""Scale-out from one checkpoint against real runc and CRIU: bursts share restores, instances are added up to
max_instances and reaped back to min_instances, services do not slow each other down, rebuilds and app
deaths are handled without losing clients."""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from tests.conftest import ECHO, echo, eventually, faulty_restore, host_resources, open_echo

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]



async def test_200_first_connections_during_a_slow_restore(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tools, attempts = faulty_restore(tmp_path, restore_delay=2)
    run = await start({"echo": ECHO}, **tools)
    port = run.port("echo")
    payloads = [os.urandom(100 + i) for i in range(200)]
    t0 = time.monotonic()
    results = await asyncio.gather(*(echo(port, p) for p in payloads))
    assert time.monotonic() - t0 >= 2  # they really did wait through the slow restore
    assert results == payloads
    assert run.metric("activator_restores_total", "echo") == 1
    assert len(attempts.read_text().split()) == 1
    assert run.metric("activator_rejected_connections_total", "echo", reason="queue-full") == 0


async def test_scale_out_to_max_and_back_to_min(start) -> None:  # type: ignore[no-untyped-def]
    # The userspace path: each connection is placed by the activator (least loaded), so placement is exact.
    # (On the kernel path connections stay where the kernel sent them: test_kernel_path.py.)
    run = await start({"echo": ECHO | {"min_instances": 1, "max_instances": 3, "target_connections": 2,
                                       "idle_timeout": "500ms", "network": "none"}})
    svc = run.act.services["echo"]
    state = run.config.settings.state_dir
    await eventually(lambda: len(svc.instances) == 1, what="min_instances kept warm before any connection")
    port = run.port("echo")
    conns = await asyncio.gather(*(open_echo(port) for _ in range(6)))
    assert len(svc.instances) == 3
    assert sorted(i.connections for i in svc.instances) == [2, 2, 2]
    # Above target with max_instances reached: the least-loaded instance takes it.
    extra = await open_echo(port)
    assert sorted(i.connections for i in svc.instances) == [2, 2, 3]
    assert run.metric("activator_restores_total", "echo") == 3
    for reader, writer in [*conns, extra]:  # every one still works end to end
        writer.write(b"ok")
        assert await asyncio.wait_for(reader.readexactly(2), 10) == b"ok"
        writer.close()
    await eventually(lambda: len(svc.instances) == 1 and run.metric("activator_idle_reaps_total", "echo") == 2,
                     what="reaped down to min_instances")
    await eventually(lambda: len(host_resources(state)["dirs"]) == 1, what="reaped instances released")


async def test_connections_at_the_idle_deadline_are_never_reset(start) -> None:  # type: ignore[no-untyped-def]
    idle = 0.3
    run = await start({"echo": ECHO | {"idle_timeout": f"{idle}s"}})
    port = run.port("echo")
    rng = random.Random(7)
    for i in range(15):
        assert await echo(port, b"round %d" % i) == b"round %d" % i
        # Around the deadline, more often past it: the daemon's idle clock starts when it sees the close, a few
        # ms after echo() returns, so ±50 ms left only 0.301-0.333 s past it and a loaded host reaped none
        await asyncio.sleep(idle + rng.uniform(-0.05, 0.1))
    assert await echo(port, b"last") == b"last"
    assert run.metric("activator_connection_errors_total", "echo") == 0
    assert run.metric("activator_idle_reaps_total", "echo") >= 1  # the race was really run


async def test_a_slow_restore_of_one_service_never_delays_another(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    tools, attempts = faulty_restore(tmp_path, restore_delay=3, only="slow")
    run = await start({"slow": ECHO, "fast": ECHO}, **tools)
    slow = asyncio.ensure_future(echo(run.port("slow"), b"eventually"))
    await eventually(lambda: attempts.exists(), what="the slow restore to begin")
    assert await echo(run.port("fast"), b"right away") == b"right away"
    assert run.metric("activator_restores_total", "slow") == 0  # still restoring while fast was served
    assert await slow == b"eventually"


async def test_rebuild_while_running_keeps_old_instances_until_they_go(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"idle_timeout": "300ms"}})
    svc = run.act.services["echo"]
    old = svc.checkpoint
    reader, writer = await open_echo(run.port("echo"))
    (inst,) = svc.instances
    reply = await run.act.rebuild("echo")
    new = svc.checkpoint
    assert new is not None and old is not None and new.created > old.created and reply["dir"] == str(new.dir)
    retired = list(new.dir.parent.glob(".retired-echo-*"))
    assert len(retired) == 1  # still mounted under the running instance: kept
    writer.write(b"still here")
    assert await asyncio.wait_for(reader.readexactly(10), 10) == b"still here"
    writer.close()
    await eventually(lambda: not svc.instances, what="the old instance reaped")
    await eventually(lambda: not retired[0].exists(), what="the replaced checkpoint removed once unused")
    assert await echo(run.port("echo"), b"from the new one") == b"from the new one"
    assert svc.instances[0].checkpoint is new and svc.instances[0] is not inst


async def test_an_instance_whose_app_died_is_replaced_without_losing_the_client(start) -> None:  # type: ignore[no-untyped-def]
    import signal

    run = await start({"echo": ECHO})
    port = run.port("echo")
    svc = run.act.services["echo"]
    assert await echo(port, b"before") == b"before"
    (dead,) = svc.instances
    pid = await dead.sandbox.pid()
    assert pid is not None
    os.kill(pid, signal.SIGKILL)  # the app crashes while its instance is idle
    # Noticed at once (a pidfd), and out of the kernel's steering rule before anything else happens.
    await eventually(lambda: dead not in svc.instances, what="the dead instance taken out")
    assert await echo(port, b"after") == b"after"  # served by a fresh instance, not closed
    assert svc.instances[0] is not dead
    assert run.metric("activator_instance_failures_total", "echo") == 1
    assert run.metric("activator_start_failures_total", "echo") == 0
    assert run.metric("activator_connection_errors_total", "echo") == 0
    assert run.metric("activator_restores_total", "echo") == 2

