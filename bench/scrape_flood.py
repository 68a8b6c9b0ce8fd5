"""/metrics while the service path is flooded: a scrape must stay fast (issue 16 item 11; target p99 < 50 ms).

One `activator run` with the busybox echo service (network: bridge, so both the activator's own listener and the
kernel path take connections) and its metrics endpoint. Scrapes are timed with nothing else going on, then while
a flood runs: FLOOD connections opened at once to the service, each sending a line and closing as soon as it is
answered (or at once, for a quarter of them: clients that send and close). Loopback and the project's own bridge
only; the flood and the scrapes are bounded in count and time. The flood runs in a process of its own; the
scrapes are counted only while it runs.
    .venv/bin/python bench/scrape_flood.py [--flood 5000] [--scrapes 200]
Prints a table (ms): p50, p99 and max scrape latency, idle and under the flood, and beside it the floor: a
trivial HTTP server in a process of its own, scraped at the same moments (on 2 cores the flood's clients and
the instance's app use the machine up; nothing the daemon does can answer faster than that).
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

BUSYBOX = "activator-demo/busybox:latest"
STATE = Path("/var/lib/activator/bench-scrape")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def scrape(port: int) -> float:
    started = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as c:
        c.sendall(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
        body = b""
        while chunk := c.recv(65536):
            body += chunk
    if not body.startswith(b"HTTP/1.1 200"):
        raise SystemExit(f"scrape failed: {body[:80]!r}")
    return (time.perf_counter() - started) * 1000


def scrapes(port: int, count: int, until: Callable[[], bool] = lambda: False) -> list[float]:
    out = []
    for _ in range(count):
        out.append(scrape(port))
        if until():
            break
        time.sleep(0.02)
    return out


async def flood(port: int, n: int, seconds: float) -> int:
    """n connections at once; each sends a line, reads the echo (or closes at once), closes. Bounded by time."""
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        try:
            reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), seconds)
            writer.write(b"ping\n")
            if i % 4:
                await asyncio.wait_for(reader.read(5), seconds)
            writer.close()
            done += 1
        except (OSError, TimeoutError):
            pass

    await asyncio.wait_for(asyncio.gather(*(one(i) for i in range(n))), seconds + 5)
    return done


def row(name: str, ms: list[float]) -> str:
    q = statistics.quantiles(ms, n=100, method="inclusive")
    return f"{name:<22} {statistics.median(ms):>8.1f} {q[98]:>8.1f} {max(ms):>8.1f} {len(ms):>6}"


def flood_process(port: int, n: int, done: Any) -> None:
    """The flood in a process of its own: the scraper must not share a GIL (or a core's queue) with it."""
    done.value = asyncio.run(flood(port, n, 60))


def floor_server(port: int) -> None:
    """The floor: a trivial HTTP server thread in a process of its own, answering a fixed body, on the same
    machine under the same flood. What a scrape cannot beat here, whatever the daemon does."""
    body = b"x" * 20000
    with socket.socket() as srv:
        srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        srv.bind(("127.0.0.1", port))
        srv.listen(64)
        while True:
            c, _ = srv.accept()
            with c:
                c.recv(8192)
                c.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\nConnection: close\r\n\r\n" % len(body) + body)


def measure(svc_port: int, metrics_port: int, args: argparse.Namespace
            ) -> tuple[list[float], list[float], list[float], int]:
    socket.create_connection(("127.0.0.1", svc_port), 10).close()  # wake it
    time.sleep(1)
    idle = scrapes(metrics_port, args.scrapes)
    floor_port = free_port()
    floor = multiprocessing.Process(target=floor_server, args=(floor_port,), daemon=True)
    floor.start()
    time.sleep(0.2)
    done = multiprocessing.Value("i", -1)
    flooder = multiprocessing.Process(target=flood_process, args=(svc_port, args.flood, done))
    flooder.start()
    if os.environ.get("PROFILE_PID_FILE"):
        Path(os.environ["PROFILE_PID_FILE"]).write_text("go")
    time.sleep(0.05)
    during: list[float] = []
    floor_ms: list[float] = []
    for _ in range(args.scrapes):  # alternating: both see the same moments of the flood
        during.append(scrape(metrics_port))
        floor_ms.append(scrape(floor_port))
        if not flooder.is_alive():
            break
        time.sleep(0.02)
    flooder.join(120)
    floor.terminate()
    return idle, during, floor_ms, int(done.value)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--flood", type=int, default=5000)
    ap.add_argument("--scrapes", type=int, default=200)
    args = ap.parse_args()
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, args.flood * 2 + 1000)), hard))
    svc_port, metrics_port = free_port(), free_port()
    cfg = {"settings": {"state_dir": str(STATE), "metrics": f"127.0.0.1:{metrics_port}",
                        "network": {"bridge": "actbench1", "subnet": "10.89.251.0/24"}},
           "services": {"echo": {"image": BUSYBOX, "command": ["netprobe", "9000"], "port": 9000,
                                 "listen": f"127.0.0.1:{svc_port}", "idle_timeout": "1h", "max_instances": 2,
                                 "client_silent_timeout": "10s"}}}
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "scrape.yaml"
        path.write_text(yaml.safe_dump(cfg))
        proc = subprocess.Popen([sys.executable, "-m", "activator", "run", "-c", str(path)],
                                stderr=subprocess.DEVNULL, stdout=subprocess.PIPE)
        try:
            assert proc.stdout is not None
            while b"metrics on" not in (line := proc.stdout.readline()):
                if proc.poll() is not None or not line:
                    raise SystemExit("activator did not start")
            idle, during, floor_ms, served = measure(svc_port, metrics_port, args)
        finally:
            proc.terminate()
            proc.wait(timeout=120)
    print(f"{'scrape (ms)':<22} {'p50':>8} {'p99':>8} {'max':>8} {'n':>6}")
    print(row("idle", idle))
    print(row(f"flood of {args.flood}", during))
    print(row("  floor (same flood)", floor_ms))
    print(f"flood connections completed: {served} of {args.flood}")


if __name__ == "__main__":
    main()
