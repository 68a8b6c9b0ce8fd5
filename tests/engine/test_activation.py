"""The core loop against real dockerd, runc and CRIU: restore on first connection, splice, reap, fall back."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import pytest

from activator.checkpoints.builder import CheckpointBuilder
from activator.checkpoints.host import runc_for
from activator.checkpoints.images import ImageSource
from activator.checkpoints.store import CheckpointStore, listening_ports
from activator.runtime.sandbox import Sandbox, new_name
from tests.conftest import ECHO, HTTPD, echo, eventually, host_resources, http_get

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]


async def test_concurrent_first_connections_share_one_restore(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO})
    port = run.port("echo")
    assert run.act.services["echo"].instances == []  # nothing runs before the first connection
    payloads = [os.urandom(1000 + i) for i in range(20)]
    results = await asyncio.gather(*(echo(port, p) for p in payloads))
    assert results == payloads
    assert run.metric("activator_restores_total", "echo") == 1
    assert len(run.act.services["echo"].instances) == 1
    assert run.metric("activator_first_connection_wait_seconds_count", "echo") >= 1
    # CRIU ran with our own config (no network lock, external mounts made by the slot), not the host's
    # /etc/criu/runc.conf; and restored no tmpfs from a tarball.
    (inst,) = run.act.services["echo"].instances
    restore_log = (inst.sandbox.layout.criu_work / "restore.log").read_text()
    assert f"Parsing config file {inst.sandbox.layout.dir}/criu.conf" in restore_log
    assert "network-lock skip" in (inst.sandbox.layout.dir / "criu.conf").read_text()
    assert not list(inst.checkpoint.images.glob("tmpfs-*.img"))


async def test_bytes_flow_both_ways_unchanged_with_half_close(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO})
    port = run.port("echo")
    big = os.urandom(4 * 2**20)
    # Several large transfers at once: exercises flow control in both directions.
    results = await asyncio.gather(*(echo(port, big[i:]) for i in range(3)))
    assert all(r == big[i:] for i, r in enumerate(results))
    assert run.metric("activator_proxied_bytes_total", "echo", direction="in") >= 3 * len(big) - 3
    assert run.metric("activator_proxied_bytes_total", "echo", direction="out") >= 3 * len(big) - 3


async def test_half_close_keeps_the_other_direction_open(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO})
    reader, writer = await asyncio.open_connection("127.0.0.1", run.port("echo"))
    writer.write(b"first")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(5), 10) == b"first"
    writer.write(b"-last")
    writer.write_eof()  # our FIN must reach the app, and its answer must still reach us
    assert await asyncio.wait_for(reader.read(), 10) == b"-last"
    assert reader.at_eof()
    writer.close()


async def test_idle_instance_is_reaped_and_restored_again(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"web": HTTPD | {"idle_timeout": "300ms"}})
    svc = run.act.services["web"]
    state = run.config.settings.state_dir
    port = run.port("web")
    assert b"200 OK" in await http_get(port)
    name = svc.instances[0].name
    assert f"activator-{name}" in host_resources(state)["netns"]
    await eventually(lambda: not svc.instances, what="idle reap")
    left = await eventually(lambda: (r := host_resources(state)) and not r["dirs"] and r, what="release")
    assert left["runc"] == [] and left["mounts"] == [] and f"activator-{name}" not in left["netns"]
    assert run.metric("activator_idle_reaps_total", "web") == 1
    assert b"200 OK" in await http_get(port)
    assert run.metric("activator_restores_total", "web") == 2
    assert svc.instances[0].name != name


async def test_open_connection_keeps_its_instance_alive(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"idle_timeout": "200ms"}})
    reader, writer = await asyncio.open_connection("127.0.0.1", run.port("echo"))
    for i in range(5):  # ~1 s of a quiet but open connection: 5 idle timeouts
        writer.write(b"ping%d" % i)
        assert await asyncio.wait_for(reader.readexactly(5), 10) == b"ping%d" % i
        await asyncio.sleep(0.2)
    assert run.metric("activator_idle_reaps_total", "echo") == 0
    writer.close()
    await eventually(lambda: not run.act.services["echo"].instances, what="reap after close")


async def test_two_instances_of_one_checkpoint_run_at_once(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"web": HTTPD})
    svc = run.act.services["web"]
    checkpoint = svc.checkpoint
    assert checkpoint is not None and 8080 in listening_ports(checkpoint.images)
    runc = runc_for(run.act.state)
    sandboxes = [Sandbox(new_name("web"), run.config.settings.state_dir / "instances", runc, idmap=checkpoint.idmap)
                 for _ in range(2)]
    try:
        for sb in sandboxes:
            await sb.prepare(checkpoint.layers, checkpoint.process, svc.config.resources, "web", checkpoint.seccomp,
                             restore=checkpoint)
        await asyncio.gather(*(sb.restore(checkpoint.images) for sb in sandboxes))
        for sb in sandboxes:
            sock = sb.netns.socket()
            await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", 8080))
            reader, writer = await asyncio.open_connection(sock=sock)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            assert b"hello from a restored busybox httpd" in await asyncio.wait_for(reader.read(), 10)
            writer.close()
        pids = [await sb.pid() for sb in sandboxes]
        assert None not in pids and pids[0] != pids[1]
    finally:
        for sb in sandboxes:
            await sb.release()
    assert not host_resources(run.config.settings.state_dir)["dirs"]


async def test_stale_checkpoint_is_rebuilt(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    run = await start({"web": HTTPD})
    svc = run.act.services["web"]
    first = svc.checkpoint
    assert first is not None
    state = run.act.state
    runc, store = runc_for(state), CheckpointStore(state)
    origin = first.origin
    def make(criu: str) -> CheckpointBuilder:
        return CheckpointBuilder(store, ImageSource(state.root), runc, state.instances, criu, origin.runc)
    same, source = await make(origin.criu).ensure(svc.config)
    assert source == "stored" and same.created == first.created
    # A different CRIU makes the old dump unusable: rebuilt, and the record says what it was made with.
    newer, source = await make(origin.criu + "-other").ensure(svc.config)
    assert source == "built" and newer.origin.criu == origin.criu + "-other" and newer.created > first.created
    # So does a changed service definition.
    changed = type(svc.config)(**{**svc.config.__dict__, "environment": (("X", "1"),)})
    again, source = await make(newer.origin.criu).ensure(changed)
    assert source == "built" and again.origin.service_fingerprint != newer.origin.service_fingerprint
    assert "X=1" in again.process.env


async def test_failed_restore_falls_back_to_cold_start(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"web": HTTPD})
    checkpoint = run.act.services["web"].checkpoint
    assert checkpoint is not None
    # A real failure: CRIU finds the process's core image missing.
    for core in checkpoint.images.glob("core-*.img"):
        core.unlink()
    assert b"hello from a restored busybox httpd" in await http_get(run.port("web"))
    assert run.metric("activator_restore_failures_total", "web") == 1
    assert run.metric("activator_cold_starts_total", "web") == 1
    assert run.act.services["web"].instances[0].how == "cold-start"
    kept = list((run.config.settings.state_dir / "logs").glob("web-*-restore.log"))
    assert kept and "Error" in kept[0].read_text()


async def test_repeated_restore_and_reap_leaks_nothing(start) -> None:  # type: ignore[no-untyped-def]
    netns_before = set(host_resources(Path("/nonexistent"))["netns"])
    run = await start({"web": HTTPD | {"idle_timeout": "100ms"}})
    svc = run.act.services["web"]
    state = run.config.settings.state_dir
    for i in range(5):
        assert b"200 OK" in await http_get(run.port("web"))
        await eventually(lambda: not svc.instances, what=f"reap {i}")
    await eventually(lambda: not host_resources(state)["dirs"], what="release")
    res = host_resources(state)
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []
    assert set(res["netns"]) <= netns_before
    assert not [c for c in res["cgroups"] if "/web-" in c]
    assert run.metric("activator_restores_total", "web") == 5


async def test_connection_waits_for_a_slow_first_checkpoint(start) -> None:  # type: ignore[no-untyped-def]
    """An app that listens only after a while: the checkpoint waits for it; the restore does not."""
    slow = ECHO | {"command": ["sh", "-c", "sleep 1; exec echo-server 9000"]}
    t0 = time.monotonic()
    run = await start({"slow": slow})
    assert time.monotonic() - t0 >= 1.0
    assert await echo(run.port("slow"), b"late but fine") == b"late but fine"


async def test_client_that_leaves_during_restore_leaves_nothing(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"idle_timeout": "300ms"}})
    _, writer = await asyncio.open_connection("127.0.0.1", run.port("echo"))
    writer.write(b"x")  # a real client: its first byte wakes the service
    await writer.drain()
    await eventually(lambda: run.act.services["echo"]._starts, what="the restore to begin")
    writer.close()  # gone before the restore finishes
    await eventually(lambda: run.metric("activator_restores_total", "echo") == 1, what="the restore")
    await eventually(lambda: run.metric("activator_open_connections", "echo") == 0, what="connection closed")
    # The restored instance was never claimed; it must still be reaped.
    await eventually(lambda: not run.act.services["echo"].instances, what="reap of the unclaimed instance")
    assert not run.act.connections
