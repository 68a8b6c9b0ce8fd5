"""UDP warm path: DNS queries per second and latency through the activator, against a direct dnsmasq.

  direct      dnsmasq from the dns test image's own root filesystem (chroot), on host loopback
  kernel      restored by the activator with network: bridge: warm flows DNATed per flow by the kernel
  relayed     network: none: every flow relayed by the activator (what a flow that began while the service
              woke gets until it ends)

The client is resolver-like: FLOWS concurrent flows (each its own socket and source port), each sending a query
and waiting for its answer (1 s) before the next, QUERIES in all; a lost query counts as lost, not retried. Each
path's runs alternate with direct's, so the ratio compares them under the same load of this noisy VM. Traffic goes
to loopback and to the bench's own bridge only; every loop is bounded in count and time.

Run as root after `make setup` and `scripts/build-images.sh dns`:
    .venv/bin/python bench/udp.py [--flows 32] [--queries 20000] [--runs 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
from warmpath import free_port, unpack_image  # noqa: E402

IMAGE = "activator-demo/dns:latest"
STATE = Path("/var/lib/activator/bench-udp")
DNSMASQ = ["dnsmasq", "--keep-in-foreground", "--user=root", "--no-resolv", "--no-hosts", "--no-poll",
           "--log-facility=/dev/null", "--address=/activator.test/192.0.2.53"]


def query(qid: int) -> bytes:
    return struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0) + b"\x01q\x09activator\x04test\x00" + b"\x00\x01\x00\x01"


class _Flow(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.waiting: asyncio.Future[None] | None = None
        self.want = -1

    def datagram_received(self, data: bytes, addr: Any) -> None:
        if self.waiting is not None and not self.waiting.done() and struct.unpack(">H", data[:2])[0] == self.want:
            self.waiting.set_result(None)


async def load(port: int, flows: int, queries: int) -> dict[str, float]:
    loop = asyncio.get_running_loop()
    latencies: list[float] = []
    lost = 0
    per_flow = max(1, queries // flows)

    async def one(f: int) -> None:
        nonlocal lost
        transport, proto = await loop.create_datagram_endpoint(_Flow, remote_addr=("127.0.0.1", port))
        try:
            for i in range(per_flow):
                proto.want = (f * 997 + i) & 0xFFFF
                proto.waiting = loop.create_future()
                t0 = time.perf_counter()
                transport.sendto(query(proto.want))
                try:
                    await asyncio.wait_for(proto.waiting, 1.0)
                    latencies.append(time.perf_counter() - t0)
                except TimeoutError:
                    lost += 1
        finally:
            transport.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(one(f) for f in range(flows)))
    elapsed = time.perf_counter() - t0
    latencies.sort()

    def pick(q: float) -> float:
        return latencies[min(len(latencies) - 1, int(q * len(latencies)))] * 1000 if latencies else float("nan")

    return {"qps": len(latencies) / elapsed, "p50_ms": pick(0.5), "p99_ms": pick(0.99), "lost": float(lost)}


def measure(port: int, direct: int, args: argparse.Namespace) -> dict[str, Any]:
    asyncio.run(load(port, 4, 200))  # wakes it (a restore) and warms it
    runs, beside = [], []
    for _ in range(args.runs):
        runs.append(asyncio.run(load(port, args.flows, args.queries)))
        beside.append(runs[-1] if port == direct else asyncio.run(load(direct, args.flows, args.queries)))
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    d = {k: statistics.median(r[k] for r in beside) for k in beside[0]}
    return med | {"x_direct": med["qps"] / d["qps"], "p99_minus_direct_ms": med["p99_ms"] - d["p99_ms"],
                  "lost_runs": sum(r["lost"] for r in runs)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flows", type=int, default=32)
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="activator-bench-udp-"))
    root = unpack_image(work, IMAGE)
    direct_port = free_port()
    procs = [subprocess.Popen(["chroot", str(root), *DNSMASQ, f"--port={direct_port}", "--listen-address=127.0.0.1",
                               "--bind-interfaces"])]
    results: dict[str, dict[str, Any]] = {}
    try:
        time.sleep(0.5)
        results["direct"] = measure(direct_port, direct_port, args)
        for name, network in (("kernel", "bridge"), ("relayed", "none")):
            port = free_port()
            cfg = {"settings": {"state_dir": str(STATE), "metrics": None,
                                "network": {"bridge": "actbench1", "subnet": "10.89.251.0/24"}},
                   "services": {"dns": {"image": IMAGE, "port": 53, "protocol": ["tcp", "udp"],
                                        "listen": f"127.0.0.1:{port}", "network": network, "idle_timeout": "1h",
                                        "max_instances": 1}}}
            path = work / f"{name}.yaml"
            path.write_text(yaml.safe_dump(cfg))
            with open(work / f"{name}.log", "wb") as log:
                act = subprocess.Popen([sys.executable, "-m", "activator", "run", "-c", str(path)], stderr=log,
                                       stdout=subprocess.PIPE)
            try:
                assert act.stdout is not None
                while b"ready on" not in (line := act.stdout.readline()) and b"metrics" not in line:
                    if act.poll() is not None or not line:
                        raise SystemExit(f"activator did not start; see {work / (name + '.log')}")
                results[name] = measure(port, direct_port, args)
            finally:
                act.send_signal(2)
                act.wait(60)
    finally:
        for p in procs:
            p.terminate()
            p.wait(10)
    print(f"\nUDP warm path, DNS A queries: {args.flows} resolver-like flows, {args.queries} queries, median of "
          f"{args.runs} (each path's runs alternated with direct's)\n")
    print(f"{'path':10} {'queries/s':>10} {'x direct':>9} {'p50 ms':>8} {'p99 ms':>8} {'p99-direct':>11} {'lost':>6}")
    for name, r in results.items():
        print(f"{name:10} {r['qps']:>10.0f} {r['x_direct']:>9.2f} {r['p50_ms']:>8.3f} {r['p99_ms']:>8.3f} "
              f"{r['p99_minus_direct_ms'] * 1000:>9.0f}us {r['lost_runs']:>6.0f}")


if __name__ == "__main__":
    main()
