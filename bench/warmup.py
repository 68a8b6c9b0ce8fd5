"""Warm before the dump: Tomcat's first requests after a restore, with and without a warm-up of the template.

Two services from the same Tomcat image: one checkpointed right after it answers its readiness probe, one after
--count warm-up requests to the same page (`warmup: {http_paths: [/], count: N}`). Each is restored --runs times;
after each restore the first --requests requests go one after another on fresh connections (HTTP/1.0), and the
first one's latency and the p99 of all of them are kept. Loopback only; bounded.
Run as root after `make setup images`:  .venv/bin/python bench/warmup.py [--runs 5] [--count 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path

import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from activator.config.model import load_config
from activator.daemon.server import Activator

ROOT = Path(__file__).resolve().parents[1]
# the demo's JVM flags (chosen for few dirty pages, see config/demo.yaml)
DEMO_TOMCAT_ENV = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())["services"]["tomcat"]["environment"]

STATE = Path("/var/lib/activator/bench-warmup")
TOMCAT = {"image": "activator-demo/tomcat:latest", "port": 8080, "idle_timeout": "300ms",
          "environment": DEMO_TOMCAT_ENV,
          "readiness": {"http_path": "/", "timeout": "120s"}}


async def get(port: int) -> float:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
    body = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    assert b" 200 " in body[:20], body[:60]
    return time.monotonic() - t0


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="activator-warmup-"))
    socks, services = {}, {}
    for name, warm in (("cold", None), ("warm", {"http_paths": ["/"], "count": args.count})):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        socks[name] = s
        services[name] = TOMCAT | {"listen": f"127.0.0.1:{s.getsockname()[1]}"} | ({"warmup": warm} if warm else {})
    (work / "w.yaml").write_text(yaml.safe_dump({"settings": {"state_dir": str(STATE), "metrics": None},
                                                 "services": services}))
    act = Activator(load_config(work / "w.yaml"), sockets=list(socks.values()))
    await act.startup()
    out: dict[str, dict[str, list[float]]] = {n: {"first": [], "p99": [], "median": []} for n in services}
    try:
        for _ in range(args.runs):
            for name in services:
                port = socks[name].getsockname()[1]
                svc = act.services[name]
                lat = [await get(port) for _ in range(args.requests)]  # the first one includes the restore
                await_first = lat[1]  # the first request the restored app serves once it is up
                out[name]["first"].append(await_first * 1000)
                out[name]["p99"].append(statistics.quantiles([x * 1000 for x in lat[1:]], n=100)[98])
                out[name]["median"].append(statistics.median(lat[1:]) * 1000)
                while svc.instances or svc._stopping:
                    await asyncio.sleep(0.05)
    finally:
        await act.shutdown()
    print(f"\nTomcat after a restore, {args.requests - 1} requests one after another (after the one that woke it), "
          f"median over {args.runs} restores, ms\n")
    print(f"{'template':28} {'first request':>14} {'median':>8} {'p99':>8}")
    for name, label in (("cold", "dumped right after readiness"), ("warm", f"warmed up ({args.count} GET /)")):
        r = out[name]
        print(f"{label:28} {statistics.median(r['first']):14.1f} {statistics.median(r['median']):8.2f} "
              f"{statistics.median(r['p99']):8.2f}")


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--count", type=int, default=2000)
    ap.add_argument("--requests", type=int, default=101)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        r.run(main(ap.parse_args()))
