"""What instance networking costs: the restore with and without a network, and what an idle service leaves.

Two services from the same busybox httpd checkpoint source, one with `network: bridge` (veth made inside the
instance's namespace, an address, a route, its rules) and one with `network: none` (loopback only). Each is woken,
reaped and woken again --runs times, alternating; the table gives each restore phase's median. Then, with both
reaped: processes, cgroups and memory left per idle service (all should be zero), and what does remain.
Run as root after `make setup`:  .venv/bin/python bench/network_cost.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
from pathlib import Path

import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activator.config.model import load_config
from activator.daemon.server import Activator

HTTPD = {"image": "activator-demo/busybox:latest", "command": ["httpd", "-f", "-p", "8080", "-h", "/www"],
         "port": 8080, "idle_timeout": "200ms"}


async def get(port: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.0\r\n\r\n")
    await reader.read()
    writer.close()


async def main(runs: int) -> None:
    work = Path(tempfile.mkdtemp(prefix="activator-netcost-"))
    work.chmod(0o711)  # the state dir is in it: instances in their user namespaces pass through it
    socks, services = [], {}
    for name, network in (("bridge", "bridge"), ("none", "none")):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        socks.append(s)
        services[name] = HTTPD | {"network": network, "listen": f"127.0.0.1:{s.getsockname()[1]}"}
    cfg = {"settings": {"state_dir": str(work / "state"), "metrics": None}, "services": services}
    (work / "c.yaml").write_text(yaml.safe_dump(cfg))
    act = Activator(load_config(work / "c.yaml"), sockets=socks)
    await act.startup()
    phases: dict[str, list[dict[str, float]]] = {"bridge": [], "none": []}
    try:
        for _ in range(runs):
            for name, sock in zip(("bridge", "none"), socks, strict=True):
                svc = act.services[name]
                await get(sock.getsockname()[1])
                inst = svc.instances[0]
                phases[name].append(inst.phases.as_dict() | {"total": inst.start_seconds})
                while svc.instances or svc._stopping:
                    await asyncio.sleep(0.02)
        idle = {name: leftovers(name) for name in ("bridge", "none")}
    finally:
        await act.shutdown()
    dropped = 2 if runs > 2 else 0  # the first two warm the caches up, when there are more
    print(f"\nRestore of busybox httpd, median of {runs - dropped} (the first {dropped} dropped), ms\n")
    print(f"{'network':8} {'prepare':>8} {'queue':>8} {'restore':>8} {'total':>7}")
    for name, rows in phases.items():
        rows = rows[dropped:]
        med = {k: statistics.median(r[k] for r in rows) * 1000 for k in rows[0]}
        print(f"{name:8} {med['prepare']:8.1f} {med['queue']:8.1f} {med['restore']:8.1f} {med['total']:7.1f}")
    print("\nAn idle service (nothing running), per service:")
    for name, left in idle.items():
        print(f"  {name:8} processes {left['processes']}, cgroups {left['cgroups']}, their RSS {left['rss'] >> 10} KiB "
              "(the prepared slot: an idle criu swrk)")


def leftovers(service: str) -> dict[str, int]:
    """What an idle service keeps (no instance): its prepared slot's cgroup and idle `criu swrk` (prepared_slots),
    counted once however many cgroup hierarchies list them."""
    groups = [p for p in Path("/sys/fs/cgroup").glob(f"*/activator/{service}-*") if p.is_dir()]
    pids = {pid for p in groups if (p / "cgroup.procs").exists() for pid in (p / "cgroup.procs").read_text().split()}
    rss = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                rss += int(line.split()[1]) * 1024
    return {"processes": len(pids), "cgroups": len({p.name for p in groups}), "rss": rss}


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=12)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main(ap.parse_args().runs))
