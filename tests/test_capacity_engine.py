"""Scale-out, admission control and backoff against real dockerd, runc and CRIU, and real sockets."""

from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

from activator import rootfs

from .conftest import ECHO, closed_without_data, echo, eventually, faulty_runc, host_resources, open_echo

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]


async def test_200_first_connections_during_a_slow_restore(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    runc, attempts = faulty_runc(tmp_path, restore_delay=2)
    run = await start({"echo": ECHO}, runc=runc)
    port = run.port("echo")
    payloads = [os.urandom(100 + i) for i in range(200)]
    t0 = time.monotonic()
    results = await asyncio.gather(*(echo(port, p) for p in payloads))
    assert time.monotonic() - t0 >= 2  # they really did wait through the slow restore
    assert results == payloads
    assert run.metric("activator_restores_total", "echo") == 1
    assert len(attempts.read_text().split()) == 1
    assert run.metric("activator_rejected_connections_total", "echo", reason="queue-full") == 0


async def test_bounded_queue_rejects_the_rest_at_once(start, tmp_path, caplog) -> None:  # type: ignore[no-untyped-def]
    runc, _ = faulty_runc(tmp_path, restore_delay=2)
    run = await start({"echo": ECHO | {"max_waiting": 5}}, runc=runc)
    port = run.port("echo")
    first = [asyncio.ensure_future(echo(port, b"queued %d" % i)) for i in range(5)]
    await eventually(lambda: run.act.services["echo"].waiting == 5, what="5 waiting")
    # The queue is full: these are closed while the restore is still under way, not after it.
    rejected = await asyncio.gather(*(closed_without_data(port) for _ in range(10)))
    assert all(rejected)
    assert run.metric("activator_restores_total", "echo") == 0
    assert run.metric("activator_rejected_connections_total", "echo", reason="queue-full") == 10
    # Logged, but as a tally: the first one at once, not ten lines.
    lines = [r.getMessage() for r in caplog.records if "admission control" in r.getMessage()]
    assert lines == [lines[0]] and "service=echo" in lines[0] and "1 queue-full" in lines[0]
    assert await asyncio.gather(*first) == [b"queued %d" % i for i in range(5)]


async def _assert_failed_start_backs_off(run, service: str, attempts_file=None) -> None:  # type: ignore[no-untyped-def]
    port = run.port(service)
    svc = run.act.services[service]
    state = run.config.settings.state_dir
    assert all(await asyncio.gather(*(closed_without_data(port) for _ in range(3))))
    assert svc.instances == []
    assert run.metric("activator_start_failures_total", service) == 1
    assert run.metric("activator_backoff_seconds", service) > 0
    await eventually(lambda: not host_resources(state)["dirs"] and not host_resources(state)["runc"],
                     what="the half-made instance removed")
    # Backing off: the next connection is closed at once, with no new attempt.
    before = run.metric("activator_restore_failures_total", service)
    assert await closed_without_data(port)
    assert run.metric("activator_rejected_connections_total", service, reason="backoff") >= 1
    assert run.metric("activator_restore_failures_total", service) == before
    if attempts_file is not None:
        assert len(attempts_file.read_text().split()) == 1
    # Once the backoff has passed, it tries again (and fails again: twice as long now).
    await eventually(lambda: run.metric("activator_backoff_seconds", service) == 0, what="backoff to expire")
    assert await closed_without_data(port)
    await eventually(lambda: run.metric("activator_start_failures_total", service) == 2, what="second attempt")
    assert svc.start_backoff.failures == 2


async def test_injected_restore_failure_backs_off(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    runc, attempts = faulty_runc(tmp_path, restore_fails=True)
    run = await start({"echo": ECHO | {"fallback": "none", "backoff": {"initial": "1s"}}}, runc=runc)
    await _assert_failed_start_backs_off(run, "echo", attempts)
    assert len(attempts.read_text().split()) == 2


async def test_app_that_never_listens_after_restore(start) -> None:  # type: ignore[no-untyped-def]
    never = ECHO | {"command": ["echo-server", "9000", "-1"], "connect_timeout": "500ms", "fallback": "none",
                    "backoff": {"initial": "1s"}}
    run = await start({"mute": never})
    await _assert_failed_start_backs_off(run, "mute")


async def test_app_that_listens_too_late_after_restore(start) -> None:  # type: ignore[no-untyped-def]
    late = ECHO | {"command": ["echo-server", "9000", "3000"], "connect_timeout": "500ms", "fallback": "none",
                   "backoff": {"initial": "1s"}}
    run = await start({"late": late})
    await _assert_failed_start_backs_off(run, "late")


async def test_app_that_listens_late_within_connect_timeout_is_served(start) -> None:  # type: ignore[no-untyped-def]
    late = ECHO | {"command": ["echo-server", "9000", "700"], "connect_timeout": "5s"}
    run = await start({"late": late})
    t0 = time.monotonic()
    assert await echo(run.port("late"), b"worth the wait") == b"worth the wait"
    assert time.monotonic() - t0 >= 0.7
    assert run.metric("activator_start_failures_total", "late") == 0


async def test_connections_at_the_idle_deadline_are_never_reset(start) -> None:  # type: ignore[no-untyped-def]
    idle = 0.3
    run = await start({"echo": ECHO | {"idle_timeout": f"{idle}s"}})
    port = run.port("echo")
    rng = random.Random(7)
    for i in range(15):
        assert await echo(port, b"round %d" % i) == b"round %d" % i
        await asyncio.sleep(idle + rng.uniform(-0.05, 0.05))
    assert await echo(port, b"last") == b"last"
    assert run.metric("activator_connection_errors_total", "echo") == 0
    assert run.metric("activator_idle_reaps_total", "echo") >= 1  # the race was really run


async def test_scale_out_to_max_and_back_to_min(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"min_instances": 1, "max_instances": 3, "target_connections": 2,
                                       "idle_timeout": "500ms"}})
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


async def test_max_connections_closes_the_excess_at_once(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"max_connections": 3}})
    port = run.port("echo")
    held = await asyncio.gather(*(open_echo(port) for _ in range(3)))
    assert await closed_without_data(port)
    assert run.metric("activator_rejected_connections_total", "echo", reason="max-connections") == 1
    held[0][1].close()
    await eventually(lambda: run.act.services["echo"].open_connections == 2, what="a slot to free up")
    assert await echo(port, b"room again") == b"room again"
    for _, w in held[1:]:
        w.close()


@pytest.mark.parametrize("version", ["v1", "v2"])
async def test_proxy_protocol_header_reaches_the_app(start, version: str) -> None:  # type: ignore[no-untyped-def]
    from activator import proxy_protocol

    run = await start({"echo": ECHO | {"proxy_protocol": version}})
    port = run.port("echo")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    client_port = writer.get_extra_info("sockname")[1]
    writer.write(b"payload")
    writer.write_eof()
    got = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    # The echo server sends back exactly what it received: the header, then our bytes.
    assert got == proxy_protocol.header(version, ("127.0.0.1", client_port), ("127.0.0.1", port)) + b"payload"


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


async def test_a_slow_restore_of_one_service_never_delays_another(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    runc, attempts = faulty_runc(tmp_path, restore_delay=3, only="slow-")
    run = await start({"slow": ECHO, "fast": ECHO}, runc=runc)
    slow = asyncio.ensure_future(echo(run.port("slow"), b"eventually"))
    await eventually(lambda: attempts.exists(), what="the slow restore to begin")
    assert await echo(run.port("fast"), b"right away") == b"right away"
    assert run.metric("activator_restores_total", "slow") == 0  # still restoring while fast was served
    assert await slow == b"eventually"


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
    await eventually(lambda: dead.sandbox.runc.pid(dead.name) is None, what="the app to be gone")
    assert await echo(port, b"after") == b"after"  # served by a fresh instance, not closed
    assert svc.instances[0] is not dead
    assert run.metric("activator_instance_failures_total", "echo") == 1
    assert run.metric("activator_start_failures_total", "echo") == 0
    assert run.metric("activator_connection_errors_total", "echo") == 0
    assert run.metric("activator_restores_total", "echo") == 2


async def test_restore_past_restore_timeout_leaves_nothing_behind(start) -> None:  # type: ignore[no-untyped-def]
    # A restore takes ~80 ms here: a 30 ms budget kills runc in the middle of CRIU's work, for real.
    run = await start({"echo": ECHO | {"restore_timeout": "30ms", "fallback": "none", "backoff": {"initial": "1s"}}})
    state = run.config.settings.state_dir
    assert await closed_without_data(run.port("echo"))
    assert run.metric("activator_restore_failures_total", "echo") == 1
    kept = sorted((state / "logs").glob("echo-*-r*.log"))
    assert kept  # whatever runc and CRIU had written is kept for the operator
    name = kept[0].name.rsplit("-", 1)[0]  # echo-<id>

    def clean() -> bool:
        res = host_resources(state)
        return (not res["runc"] and not res["dirs"] and not rootfs.mounts_under(state / "runc")
                and not [c for c in res["cgroups"] if c.endswith(f"/activator/{name}")]
                and [p.name for p in (state / "runc").iterdir()] == ["criu.conf"])

    await eventually(clean, what="no container, mount, cgroup or runc state left")
    await asyncio.sleep(0.5)  # and nothing turns up later from a runc that finished after all
    assert clean()
