"""Warm path: bulk throughput and request latency once an instance is up, three ways side by side.

  direct                 the echo server (scripts/images/echo-server.c) on host loopback, no proxy
  systemd-socket-proxyd  the same server behind systemd-socket-proxyd (socket-activated, as systemd would)
  activator              the same binary restored in a container, behind `activator run`

Bulk: one connection sends --mib MiB and reads them back (MiB/s each way). Latency: --rounds ping-pongs of 64
bytes on one connection (p50/p99 in µs). Loopback only; every loop is bounded.
Run as root after `make setup images`:  .venv/bin/python bench/warmpath.py
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_port(port: int, deadline: float = 60) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(port)


def bulk(port: int, mib: int) -> float:
    payload = os.urandom(1 << 20)
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        def send() -> None:
            for _ in range(mib):
                s.sendall(payload)
        t0 = time.monotonic()
        th = threading.Thread(target=send)
        th.start()
        got = 0
        # No half-close here: systemd-socket-proxyd drops the return direction on the client's FIN.
        while got < mib << 20 and (chunk := s.recv(1 << 20)):
            got += len(chunk)
        th.join()
        dt = time.monotonic() - t0
    assert got == mib << 20, got
    return mib / dt


def latency(port: int, rounds: int) -> list[float]:
    msg = b"x" * 64
    out = []
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        for _ in range(rounds):
            t0 = time.perf_counter()
            s.sendall(msg)
            got = 0
            while got < len(msg):
                got += len(s.recv(64))
            out.append(time.perf_counter() - t0)
    return out


def measure(port: int, args: argparse.Namespace) -> tuple[float, list[float]]:
    bulk(port, 8)  # warm-up (and, for the activator, the restore)
    return statistics.median(bulk(port, args.mib) for _ in range(3)), latency(port, args.rounds)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mib", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5000)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="activator-warm-"))
    server = work / "echo-server"
    subprocess.run(["gcc", "-O2", "-o", str(server), str(ROOT / "scripts/images/echo-server.c")], check=True)
    results: dict[str, tuple[float, list[float]]] = {}
    procs: list[subprocess.Popen[bytes]] = []
    try:
        direct = free_port()
        procs.append(subprocess.Popen([str(server), str(direct)]))
        wait_port(direct)
        results["direct"] = measure(direct, args)

        proxyd = free_port()
        procs.append(subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{proxyd}",
                                       "/lib/systemd/systemd-socket-proxyd", f"127.0.0.1:{direct}"],
                                      stderr=subprocess.DEVNULL))
        wait_port(proxyd)
        results["systemd-socket-proxyd"] = measure(proxyd, args)

        act = free_port()
        cfg = {"settings": {"state_dir": "/var/lib/activator/bench-warm", "metrics": None},
               "services": {"echo": {"image": "activator-demo/busybox:latest", "command": ["echo-server", "9000"],
                                     "port": 9000, "listen": f"127.0.0.1:{act}", "idle_timeout": "5m"}}}
        (work / "warm.yaml").write_text(yaml.safe_dump(cfg))
        procs.append(subprocess.Popen([sys.executable, "-m", "activator", "run", "-c", str(work / "warm.yaml")],
                                      stderr=subprocess.DEVNULL, stdout=subprocess.DEVNULL))
        wait_port(act)
        results["activator"] = measure(act, args)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(60)
    print(f"\nWarm path: {args.mib} MiB echoed (median of 3), {args.rounds} x 64-byte round trips\n")
    print(f"{'path':24} {'MiB/s':>8} {'p50 µs':>8} {'p99 µs':>8}")
    for name, (mibs, lat) in results.items():
        q = statistics.quantiles([x * 1e6 for x in lat], n=100)
        print(f"{name:24} {mibs:8.0f} {q[49]:8.0f} {q[98]:8.0f}")


if __name__ == "__main__":
    main()
