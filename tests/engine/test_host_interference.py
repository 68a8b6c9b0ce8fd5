"""What the host does to a running daemon: a firewall reload takes its tables, a Docker restart its iptables
accepts, and at stop any cleanup step may fail (issue 16 items 1 and 2). Against real nftables, iptables, runc,
CRIU and namespaces; faults at stop are injected at the edge (the one call that fails), never by mocking the
rest."""

from __future__ import annotations

import asyncio
import subprocess
from pathlib import Path
from typing import Any

import pytest

from activator.net import firewall, network
from activator.net.nft import Nft, NftError
from activator.runtime import cgroups, rootfs
from tests.conftest import BUSYBOX, eventually, host_resources
from tests.netfixtures import ask, ask_once

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

PROBE = {"image": BUSYBOX, "command": ["netprobe", "9000"], "port": 9000}


def _nft(family: str, table: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["nft", "list", "table", family, table], capture_output=True, text=True)


def _delete_tables(table: str) -> None:
    for family in ("ip", "bridge"):
        subprocess.run(["nft", "delete", "table", family, table], capture_output=True)


async def test_a_firewall_reload_is_noticed_and_everything_put_back(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"probe": PROBE})
    port = run.port("probe")
    svc, net = run.act.services["probe"], run.act.network
    assert net is not None
    held_r, held_w = await asyncio.open_connection("127.0.0.1", port)
    assert (await ask(held_r, held_w, "peer")).startswith("peer 127.0.0.1 ")  # woke it (spliced)
    kept_r, kept_w = await asyncio.open_connection("127.0.0.1", port)
    assert (await ask(kept_r, kept_w, "peer")).startswith("peer 10.89.0.1 ")  # the kernel path, kept open

    def repairs(what: str) -> float:
        return run.act.metrics.registry.get_sample_value("activator_network_repairs_total", {"what": what}) or 0

    # What `nft flush ruleset` does to activator (without taking Docker's tables too), and a Docker restart
    # that rewrites DOCKER-USER.
    await asyncio.to_thread(_delete_tables, net.table)
    await asyncio.to_thread(firewall.close, net.bridge)
    await eventually(lambda: repairs("nftables") >= 1, what="the tables put back")
    listing = await asyncio.to_thread(_nft, "ip", net.table)
    (inst,) = svc.instances
    att = inst.sandbox.attachment
    assert f"svc_{network.ident('probe')}" in listing.stdout and f"{att.ip} . 9000" in listing.stdout
    assert att.veth in (await asyncio.to_thread(_nft, "bridge", net.table)).stdout
    await eventually(lambda: repairs("iptables") >= 1, timeout=15, what="the iptables accepts put back")
    assert await asyncio.to_thread(net.firewall_intact)
    # The connection steered before the flush kept going; new ones are steered and counted again.
    assert (await ask(kept_r, kept_w, "peer")).startswith("peer 10.89.0.1 ")
    assert (await ask_once("127.0.0.1", port, "peer")).startswith("peer 10.89.0.1 ")
    await eventually(lambda: inst.track.kernel >= 1, what="the kept connection counted again")
    for w in (held_w, kept_w):
        w.close()
    await run.act.shutdown()
    assert run.act.teardown_failures == []


def _fault(step: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Make one teardown step fail, once, the way the host would make it fail."""
    def once(real: Any, error: Exception) -> Any:
        fired: list[int] = []

        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not fired:
                fired.append(1)
                raise error
            return real(*args, **kwargs)
        return wrapper

    if step == "nftables":
        real_run = Nft.run

        def run(self: Nft, cmd: str) -> None:
            if cmd.startswith("delete table"):
                raise NftError("nftables: Error: Could not process rule: Device or resource busy")
            real_run(self, cmd)
        monkeypatch.setattr(Nft, "run", run)
    elif step == "conntrack":
        monkeypatch.setattr(network, "flush_conntrack", once(network.flush_conntrack, OSError(105, "No buffer space")))
    elif step == "iptables":
        monkeypatch.setattr(firewall, "close", once(firewall.close, OSError(16, "xtables lock")))
    elif step == "cgroup":
        monkeypatch.setattr(cgroups, "remove", once(cgroups.remove, OSError(16, "Device or resource busy")))
    elif step == "mount":
        monkeypatch.setattr(rootfs, "unmount", once(rootfs.unmount, OSError(16, "umount: target is busy")))


@pytest.mark.parametrize("step", ["nftables", "conntrack", "iptables", "cgroup", "mount"])
async def test_shutdown_finishes_whatever_fails(start, monkeypatch: pytest.MonkeyPatch, step: str) -> None:  # type: ignore[no-untyped-def]
    run = await start({"probe": PROBE})
    state = run.config.settings.state_dir
    assert (await ask_once("127.0.0.1", run.port("probe"), "peer")).startswith("peer ")
    net = run.act.network
    assert net is not None
    _fault(step, monkeypatch)
    await run.act.shutdown()
    monkeypatch.undo()
    left = await asyncio.to_thread(host_resources, state)
    try:
        assert run.act.teardown_failures, "the failure must reach the exit status"
        assert any(step in f or "busy" in f or "buffer" in f for f in run.act.teardown_failures), \
            run.act.teardown_failures
        # Everything else was released: no container, namespace, process or instance directory is left.
        assert left["runc"] == [] and left["netns"] == [] and left["procs"] == [], left
        assert left["mounts"] == [] or step == "mount", left
        if step == "nftables":
            assert (await asyncio.to_thread(_nft, "ip", net.table)).returncode == 0  # left, and said so
    finally:  # put the host right, whatever was left
        for point in sorted(left["mounts"], reverse=True):
            await asyncio.to_thread(rootfs.unmount, Path(point))
        for name in {Path(c).name for c in left["cgroups"]}:
            await asyncio.to_thread(cgroups.remove, name)
        if step == "nftables":
            await asyncio.to_thread(_delete_tables, net.table)
        if step == "iptables":
            await asyncio.to_thread(firewall.close, net.bridge)
    assert await asyncio.to_thread(lambda: host_resources(state)["mounts"]) == []


async def test_an_ip_netns_add_by_someone_else_hides_nothing(start) -> None:  # type: ignore[no-untyped-def]
    """iproute2's `ip netns add` bind-mounts /run/netns onto itself when it is not a mount point yet, which hid
    the namespaces activator had pinned there: its instance's could then not be removed at stop. activator makes
    /run/netns what iproute2 makes it (a shared mount of itself) before it pins anything."""
    import uuid

    run = await start({"probe": PROBE})
    state = run.config.settings.state_dir
    assert (await ask_once("127.0.0.1", run.port("probe"), "peer")).startswith("peer ")
    points = [ln.split()[4] for ln in Path("/proc/self/mountinfo").read_text().splitlines()]
    assert "/run/netns" in points  # a mount of itself (Path.is_mount misses a bind mount of the same file system)
    other = f"acttest-{uuid.uuid4().hex[:8]}"  # someone else's namespace, as an operator would add one
    added = await asyncio.to_thread(subprocess.run, ["ip", "netns", "add", other], capture_output=True, text=True)
    assert added.returncode == 0, added.stderr
    try:
        (inst,) = run.act.services["probe"].instances
        assert inst.sandbox.netns.path.exists()  # still there, not hidden under a new mount
        await run.act.shutdown()
        assert run.act.teardown_failures == []
        left = await asyncio.to_thread(host_resources, state)
        assert left["netns"] == [] and left["runc"] == [] and left["mounts"] == [], left
    finally:
        await asyncio.to_thread(subprocess.run, ["ip", "netns", "del", other], capture_output=True)
