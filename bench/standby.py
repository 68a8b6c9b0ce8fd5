"""Standby: time to first byte when the first connection thaws a frozen instance, beside a warm request and a
restore, for the demo apps; and what a standby costs in memory.

For each app two services run under one `activator run` (a subprocess; the client is this process): APP-standby
with `standby: 1`, APP-restore with none (a prepared slot, the default). Each round, with nothing of either
running:
  standby   connect -> first byte of a GET to APP-standby (its standby is thawed)
  warm      the same again at once (the instance now runs; the kernel path steers it, unless --network none)
  restore   connect -> first byte of a GET to APP-restore (restored from the checkpoint)
then both are reaped (idle_timeout) and the standby is replaced, before the next round.

Run as root after `make setup images`:  .venv/bin/python bench/standby.py [--runs N] [--apps hello,tomcat]
Prints a table (median, min, max in ms; the thaw itself as the daemon logged it) and the standbys' memory.
Traffic goes to loopback only.
"""

from __future__ import annotations

import argparse
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import yaml
from coldstart import APPS, REQUEST, free_port

STATE = Path("/var/lib/activator/bench-standby")


def ttfb(port: int) -> float:
    """Connect, send a GET, wait for the first byte: seconds (one try; a failure is a failure)."""
    t0 = time.perf_counter()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
        s.sendall(REQUEST)
        if not s.recv(1):
            raise RuntimeError(f"port {port}: closed without an answer")
        return time.perf_counter() - t0


def metrics(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    return {m[1]: float(m[2]) for m in re.finditer(r'^(activator_\w+\{service="[\w-]+"\}) (\S+)$', text, re.M)}


def wait(port: int, want: dict[str, float], limit: float = 60) -> dict[str, float]:
    deadline = time.monotonic() + limit
    while True:
        m = metrics(port)
        if all(m.get(k) == v for k, v in want.items()):
            return m
        if time.monotonic() > deadline:
            raise TimeoutError(f"waited {limit}s for {want}")
        time.sleep(0.05)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--apps", default=",".join(APPS))
    ap.add_argument("--network", default="bridge", choices=["bridge", "none"],
                    help="none: every byte through the activator, the warm request too")
    args = ap.parse_args()
    apps = args.apps.split(",")
    ports = {f"{a}-{w}": free_port() for a in apps for w in ("standby", "restore")}
    metrics_port = free_port()
    services = {}
    for name, port in ports.items():
        app, _, way = name.rpartition("-")
        services[name] = APPS[app] | {"listen": f"127.0.0.1:{port}", "idle_timeout": "500ms",
                                      "standby": 1 if way == "standby" else 0, "network": args.network}
    path = Path(tempfile.mkdtemp()) / "standby.yaml"
    path.write_text(yaml.safe_dump({"settings": {"state_dir": str(STATE), "metrics": f"127.0.0.1:{metrics_port}"},
                                    "services": services}))
    log = path.with_suffix(".log")
    rows: dict[str, dict[str, list[float]]] = {a: {"standby": [], "warm": [], "restore": []} for a in apps}
    memory: dict[str, float] = {}
    with log.open("w") as err, subprocess.Popen([sys.executable, "-m", "activator", "run", "-c", str(path)],
                                                stdout=subprocess.PIPE, stderr=err, text=True) as proc:
        assert proc.stdout is not None
        while "metrics on" not in proc.stdout.readline():
            if proc.poll() is not None:
                raise SystemExit(f"activator did not start; see {log}")
        try:
            for _ in range(args.runs):
                for app in apps:
                    sb, rs = f"{app}-standby", f"{app}-restore"
                    m = wait(metrics_port, {f'activator_standby_instances{{service="{sb}"}}': 1,
                                            f'activator_instances{{service="{sb}"}}': 0,
                                            f'activator_instances{{service="{rs}"}}': 0}, limit=180)
                    memory[app] = m[f'activator_standby_memory_bytes{{service="{sb}"}}']
                    time.sleep(0.3)  # the replaced standby's restore and slot refills are done: a quiet host
                    rows[app]["standby"].append(ttfb(ports[sb]))
                    rows[app]["warm"].append(ttfb(ports[sb]))
                    rows[app]["restore"].append(ttfb(ports[rs]))
        finally:
            proc.terminate()
            proc.wait(60)
    thaws = [float(x) for x in re.findall(r"thawed from standby in ([\d.]+) ms", log.read_text())]
    print(f"\nTime to first byte, ms ({args.runs} runs; nothing running before 'standby' and 'restore')\n")
    print(f"{'app':8} {'path':34} {'median':>8} {'min':>8} {'max':>8}")
    for app, ways in rows.items():
        for way, label in (("warm", "warm request (instance running)"), ("standby", "first request, standby thawed"),
                           ("restore", "first request, restored")):
            ms = [x * 1000 for x in ways[way]]
            print(f"{app:8} {label:34} {statistics.median(ms):8.2f} {min(ms):8.2f} {max(ms):8.2f}")
        d = [(s - w) * 1000 for s, w in zip(ways["standby"], ways["warm"], strict=True)]
        print(f"{app:8} {'standby minus warm (same round)':34} {statistics.median(d):8.2f} {min(d):8.2f} "
              f"{max(d):8.2f}")
    if thaws:
        print(f"\nthe thaw itself (daemon log): median {statistics.median(thaws):.3f} ms, max {max(thaws):.3f} ms")
    print("\nmemory one standby is charged (its memory cgroup):")
    for app, b in memory.items():
        print(f"  {app:8} {b / 2**20:8.1f} MiB")


if __name__ == "__main__":
    main()
