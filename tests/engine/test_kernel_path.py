"""The warm path in the kernel: once an instance is ready, new connections are steered to it by nftables and never
cross the activator. Everything the product promises still holds there: idle reaping counts those connections,
reaping never loses one, scale-out counts them, max_connections and draining hold, and the bytes do bypass the
daemon (it can be stopped with SIGSTOP and warm services keep answering)."""

from __future__ import annotations

import asyncio
import random
import signal
import socket
import time
from pathlib import Path

import pytest

from tests.conftest import BUSYBOX, eventually, host_resources, write_config
from tests.daemonproc import ACTIVATOR, daemon, free_port, stop
from tests.netfixtures import ask, ask_once

pytestmark = pytest.mark.engine

PROBE = {"image": BUSYBOX, "command": ["netprobe", "9000"], "port": 9000}
GATEWAY = "10.89.0.1"  # loopback clients steered by the kernel are masqueraded: the app sees the bridge address


def peer(port: int, timeout: float = 10) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as c:
        c.sendall(b"peer\n")
        return c.makefile().readline().strip()


def test_warm_connections_bypass_the_daemon(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, {"probe": PROBE | {"listen": f"127.0.0.1:{port}"}})
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], tmp_path / "activator.log") as proc:
        assert peer(port).startswith("peer 127.0.0.1 ")  # woke it: spliced by the activator
        existing = socket.create_connection(("127.0.0.1", port), timeout=10)
        lines = existing.makefile()
        existing.sendall(b"peer\n")
        assert lines.readline().startswith(f"peer {GATEWAY} ")  # steered by the kernel
        proc.send_signal(signal.SIGSTOP)
        try:
            # The daemon cannot run a single instruction now; the kernel path does not need it.
            for _ in range(5):
                assert peer(port, timeout=5).startswith(f"peer {GATEWAY} ")
            existing.sendall(b"still here\n")
            assert lines.readline().strip() == "still here"
            during = socket.create_connection(("127.0.0.1", port), timeout=5)
            during.sendall(b"opened while stopped\n")
        finally:
            proc.send_signal(signal.SIGCONT)
        assert during.makefile().readline().strip() == "opened while stopped"  # nothing was lost
        during.close()
        lines.close()
        existing.close()
        assert peer(port).startswith(f"peer {GATEWAY} ")
        assert stop(proc) == 0
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []


@pytest.mark.asyncio
async def test_an_open_kernel_connection_keeps_its_instance_and_idle_reaps_count_it(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"probe": PROBE | {"idle_timeout": "300ms"}})
    port = run.port("probe")
    svc = run.act.services["probe"]
    assert (await ask_once("127.0.0.1", port, "peer")).startswith("peer 127.0.0.1 ")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert (await ask(reader, writer, "peer")).startswith(f"peer {GATEWAY} ")
    (inst,) = svc.instances
    await eventually(lambda: inst.track.kernel == 1, what="the kernel connection counted")
    assert run.act.status()["services"][0]["instances"][0]["kernel_connections"] == 1
    await asyncio.sleep(1.5)  # five idle timeouts of silence on an open connection
    assert svc.instances == [inst] and run.metric("activator_idle_reaps_total", "probe") == 0
    assert await ask(reader, writer, "after the silence") == "after the silence"
    writer.close()
    await eventually(lambda: not svc.instances, what="reaped once the connection ended")
    assert run.metric("activator_idle_reaps_total", "probe") == 1


@pytest.mark.asyncio
async def test_reaping_at_the_idle_deadline_never_loses_a_connection(start) -> None:  # type: ignore[no-untyped-def]
    idle = 0.3
    run = await start({"probe": PROBE | {"idle_timeout": f"{idle}s"}})
    port = run.port("probe")
    rng = random.Random(11)
    answers = []
    for i in range(40):  # gaps around the idle deadline: some land while an instance is withdrawn or going
        answers.append(await ask_once("127.0.0.1", port, f"n{i}"))
        await asyncio.sleep(idle + rng.uniform(-0.1, 0.25))
    assert answers == [f"n{i}" for i in range(40)]
    assert run.metric("activator_idle_reaps_total", "probe") >= 3  # the race was really run
    assert run.metric("activator_connection_errors_total", "probe") == 0


@pytest.mark.asyncio
async def test_scale_out_counts_kernel_connections(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"probe": PROBE | {"max_instances": 3, "target_connections": 2, "idle_timeout": "1s"}})
    port = run.port("probe")
    svc = run.act.services["probe"]
    held = []
    for _ in range(6):
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await ask(r, w, "peer")).startswith("peer ")
        held.append((r, w))
    # Demand 6 at 2 each: two more instances, started from the kernel-path counts, join the rule when ready.
    await eventually(lambda: len(svc.instances) == 3, what="scaled out to 3", timeout=15)
    for _ in range(6):  # new connections are spread over all of them (round robin)
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await ask(r, w, "peer")).startswith(f"peer {GATEWAY} ")
        held.append((r, w))
    await eventually(lambda: sum(i.connections for i in svc.instances) == 12, what="all 12 counted")
    assert all(i.connections >= 2 for i in svc.instances), [i.connections for i in svc.instances]
    for _, w in held:
        w.close()
    await eventually(lambda: not svc.instances, what="all reaped", timeout=20)


@pytest.mark.asyncio
async def test_max_connections_holds_across_both_paths(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"probe": PROBE | {"max_connections": 3}})
    port = run.port("probe")
    held = []
    for _ in range(3):  # the first spliced, the others steered by the kernel
        r, w = await asyncio.open_connection("127.0.0.1", port)
        assert (await ask(r, w, "peer")).startswith("peer ")
        held.append((r, w))
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await eventually(lambda: run.metric("activator_rejected_connections_total", "probe", reason="max-connections")
                     == 1, what="the refusal counted")
    held.pop()[1].close()
    await asyncio.sleep(0.2)
    assert (await ask_once("127.0.0.1", port, "peer")).startswith("peer ")
    for _, w in held:
        w.close()


@pytest.mark.asyncio
async def test_kernel_path_traffic_is_counted(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"probe": PROBE})
    port = run.port("probe")
    await ask_once("127.0.0.1", port, "wake")
    before_in = run.metric("activator_proxied_bytes_total", "probe", direction="in")
    before_conns = run.metric("activator_connections_total", "probe")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for i in range(50):  # 50 KB in lines netprobe echoes (it reads lines of up to 1 KiB)
        assert await ask(reader, writer, f"{i:04d}" + "x" * 996) == f"{i:04d}" + "x" * 996
    writer.close()
    await eventually(lambda: run.metric("activator_proxied_bytes_total", "probe", direction="in") >=
                     before_in + 50_000, what="kernel-path bytes counted (IP packets, headers included)")
    await eventually(lambda: run.metric("activator_connections_total", "probe") == before_conns + 1,
                     what="the steered connection counted")


@pytest.mark.asyncio
async def test_proxy_protocol_services_stay_on_the_userspace_path(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"probe": PROBE | {"proxy_protocol": "v1"}})
    port = run.port("probe")
    for _ in range(3):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        me = writer.get_extra_info("sockname")[1]
        # netprobe echoes the header line it does not know, then answers: the header came first, every time.
        assert await ask(reader, writer, "peer") == f"PROXY TCP4 127.0.0.1 127.0.0.1 {me} {port}"
        assert (await reader.readline()).decode().startswith("peer 127.0.0.1 ")
        writer.close()
    assert not run.act.services["probe"].status()["kernel_path"]
    assert run.act.services["probe"].instances[0].track.served == 3


def test_sigterm_drains_kernel_connections_then_exits(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, {"probe": PROBE | {"listen": f"127.0.0.1:{port}"}}, drain_timeout="10m")
    log = tmp_path / "activator.log"
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        assert peer(port).startswith("peer 127.0.0.1 ")
        held = socket.create_connection(("127.0.0.1", port), timeout=10)
        lines = held.makefile()
        held.sendall(b"peer\n")
        assert lines.readline().startswith(f"peer {GATEWAY} ")  # a kernel-path connection
        proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 30
        while "draining 1 connection(s)" not in log.read_text():
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.02)
        with pytest.raises(OSError):  # nobody new is steered or accepted while draining
            socket.create_connection(("127.0.0.1", port), timeout=2)
        held.sendall(b"during the drain\n")
        assert lines.readline().strip() == "during the drain"
        assert proc.poll() is None
        lines.close()  # (the file object holds the socket open too)
        held.close()  # the last connection ends: the drain is over
        assert proc.wait(timeout=60) == 0
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []
