"""PostgreSQL warm path: pgbench -S (select only) against the same server, three ways side by side.

  direct                 postgres from the test image's own root filesystem (chroot, as user postgres), on host
                         loopback: no proxy, no container, no user namespace
  activator (kernel)     the image restored by `activator run` in its user namespace (network: bridge):
                         connections steered to the instance by nftables DNAT, bytes never cross the daemon
  activator (userspace)  the same with network: none: every byte spliced through the daemon

pgbench itself comes from the image (chroot), so the host needs no PostgreSQL. Loopback and the project's own
bridge only; every load is bounded by time. Run as root after `make setup` and `scripts/build-images.sh postgres`:
    .venv/bin/python bench/pgbench.py [--seconds S] [--clients C] [--runs R]
Prints a table (the median of R runs per cell: transactions/s, mean latency, and the ratio to direct).
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml
from warmpath import free_port, unpack_image, wait_listening

IMAGE = "activator-test/postgres:latest"
STATE = Path("/var/lib/activator/bench-pg")
BIN = "/usr/lib/postgresql/15/bin"


def pgbench(root: Path, port: int, *args: str, timeout: float = 300) -> str:
    done = subprocess.run(["chroot", "--userspec=postgres:postgres", str(root), f"{BIN}/pgbench", "-h", "127.0.0.1",
                           "-p", str(port), "-U", "postgres", *args, "postgres"],
                          capture_output=True, text=True, timeout=timeout, env=os.environ | {"PGCONNECT_TIMEOUT": "60"})
    if done.returncode != 0:
        raise SystemExit(f"pgbench {' '.join(args)} on port {port} failed: {done.stderr.strip()[-300:]}")
    return done.stdout


def select_only(root: Path, port: int, clients: int, seconds: int) -> dict[str, float]:
    out = pgbench(root, port, "-S", "-c", str(clients), "-j", str(min(clients, 2)), "-T", str(seconds),
                  timeout=seconds + 120)
    tps = float(re.search(r"tps = ([\d.]+)", out).group(1))  # type: ignore[union-attr]
    lat = float(re.search(r"latency average = ([\d.]+) ms", out).group(1))  # type: ignore[union-attr]
    return {"tps": tps, "latency_ms": lat}


def measure(name: str, root: Path, port: int, args: argparse.Namespace) -> dict[str, Any]:
    wait_listening(port)
    pgbench(root, port, "-i", "-q", "-s", "1")  # wakes an activator service (a restore) and makes the tables
    runs = [select_only(root, port, args.clients, args.seconds) for _ in range(args.runs)]
    print(f"  {name}: done", flush=True)
    return {"path": name} | {k: statistics.median(r[k] for r in runs) for k in runs[0]}


def start_activator(work: Path, port: int, network: str) -> subprocess.Popen[bytes]:
    cfg = {"settings": {"state_dir": str(STATE), "metrics": None,
                        "network": {"bridge": "actpg0", "subnet": "10.89.251.0/24"}},
           "services": {"pg": {"image": IMAGE, "port": 5432, "listen": f"127.0.0.1:{port}", "idle_timeout": "1h",
                               "network": network, "volumes": [f"pgbench-{network}:/var/lib/postgresql/data"],
                               # it listens before it accepts ("the database system is starting up"): ready
                               # once pg_isready says so, over its unix socket (no TCP state in the dump)
                               "readiness": {"timeout": "120s", "command": ["pg_isready", "-q", "-h", "/tmp"]},
                               # the file's only service would share memory (KSM) by default: ksmd's scanning
                               # takes a CPU of this 2-core host from the server and the client
                               "share_memory": False}}}
    path = work / f"pg-{network}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.Popen([sys.executable, "-m", "activator", "run", "-c", str(path)],
                            stderr=subprocess.DEVNULL, stdout=subprocess.PIPE)
    assert proc.stdout is not None
    while b"ready on" not in (line := proc.stdout.readline()):
        if proc.poll() is not None or not line or b"NOT serving" in line:
            proc.terminate()
            proc.wait(120)
            raise SystemExit(f"activator did not start: {line.decode(errors='replace').strip()}")
    return proc


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=10)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    if subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True).returncode != 0:
        raise SystemExit(f"needs {IMAGE}: scripts/build-images.sh postgres")
    work = Path(tempfile.mkdtemp(prefix="activator-pgbench-"))
    work.chmod(0o755)  # user postgres passes through it into the chroot
    root = unpack_image(work, IMAGE)
    results = []
    try:
        port = free_port()
        direct = subprocess.Popen(["chroot", "--userspec=postgres:postgres", str(root), f"{BIN}/postgres", "-D",
                                   "/var/lib/postgresql/data", "-p", str(port), "-c", "listen_addresses=127.0.0.1"],
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            results.append(measure("direct", root, port, args))
        finally:
            direct.terminate()
            direct.wait(60)
        for network, name in (("bridge", "activator (kernel)"), ("none", "activator (userspace)")):
            port = free_port()
            act = start_activator(work, port, network)
            try:
                results.append(measure(name, root, port, args))
            finally:
                act.terminate()
                act.wait(120)
    finally:
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(STATE / "volumes", ignore_errors=True)  # the next run starts from the image's data again
    base = results[0]["tps"]
    print(f"\npgbench -S, {args.clients} clients x {args.seconds}s; median of {args.runs}\n")
    print(f"{'path':24} {'tps':>10} {'latency ms':>11} {'vs direct':>10}")
    for r in results:
        print(f"{r['path']:24} {r['tps']:10.0f} {r['latency_ms']:11.3f} {r['tps'] / base:10.2f}")


if __name__ == "__main__":
    main()
