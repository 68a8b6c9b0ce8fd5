"""Warm path over HTTP: wrk against the demo Tomcat three ways, each path's runs alternated with direct's.

  direct               Tomcat from the demo image's own root filesystem (chroot), on host loopback
  activator (kernel)   restored by `activator run` (network: bridge): nftables DNAT over a veth
  activator (handoff)  handoff: true: Tomcat accepts from the activator's own listening socket

wrk -t2 -c32 for --seconds per run (requests/s, p50 and p99 from --latency), after a JIT warm-up of each server.
Loopback and the project's own bridge only; every load is bounded in time.
Run as root after `make setup` and `scripts/build-images.sh tomcat`:
    .venv/bin/python bench/warmpath_http.py [--seconds S] [--runs R] [--paths kernel,handoff]
Prints a table (medians of R runs); no chart.
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
import time
from pathlib import Path
from typing import Any

import yaml
from warmpath import free_port, unpack_image, wait_listening

IMAGE = "activator-demo/tomcat:latest"
STATE = Path("/var/lib/activator/bench-warm-http")
JAVA_OPTS = "-XX:+UseSerialGC -Xms32m -Xmx256m -Xss256k -XX:-UsePerfData -XX:TieredStopAtLevel=1"  # config/demo.yaml
UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3}


def wrk(port: int, seconds: int, connections: int = 32) -> dict[str, float]:
    out = subprocess.run(["wrk", "-t2", f"-c{connections}", f"-d{seconds}s", "--latency", f"http://127.0.0.1:{port}/"],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    if "Non-2xx" in out or "Socket errors" in out:
        raise RuntimeError(f"wrk saw errors:\n{out}")
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))  # type: ignore[union-attr]

    def pct(p: str) -> float:
        m = re.search(rf"^\s+{p}%\s+([\d.]+)(us|ms|s)\s*$", out, re.M)
        assert m is not None, out
        return float(m.group(1)) * UNITS[m.group(2)]

    return {"rps": rps, "p50_ms": pct("50"), "p99_ms": pct("99")}


def start_direct(root: Path, port: int) -> subprocess.Popen[bytes]:
    """The image's Tomcat on the host, on its own port (server.xml's 8080 rewritten)."""
    server_xml = root / "etc/tomcat10/server.xml"  # CATALINA_BASE/conf links there (an absolute link)
    server_xml.write_text(server_xml.read_text().replace('port="8080"', f'port="{port}"')
                          .replace('port="8005"', 'port="-1"'))
    env = {"CATALINA_HOME": "/usr/share/tomcat10", "CATALINA_BASE": "/var/lib/tomcat10", "CATALINA_TMPDIR": "/tmp",
           "JAVA_HOME": "/usr/lib/jvm/java-17-openjdk-amd64", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
           "JAVA_OPTS": JAVA_OPTS, "MALLOC_ARENA_MAX": "2"}
    # The JVM's launcher finds its libraries from /proc/self/exe
    subprocess.run(["mount", "-t", "proc", "proc", str(root / "proc")], check=True)
    return subprocess.Popen(["chroot", str(root), "/usr/share/tomcat10/bin/catalina.sh", "run"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def start_activator(work: Path, port: int, handoff: bool) -> subprocess.Popen[bytes]:
    cfg = {"settings": {"state_dir": str(STATE), "metrics": None, "network": {"bridge": "actbench1",
                                                                              "subnet": "10.89.251.0/24"}},
           "services": {"tomcat": {
               "image": IMAGE, "port": 8080, "listen": f"127.0.0.1:{port}", "idle_timeout": "1h",
               "max_instances": 1, "handoff": handoff, "readiness": {"http_path": "/", "timeout": "120s"},
               "environment": {"JAVA_OPTS": JAVA_OPTS, "MALLOC_ARENA_MAX": "2"}}}}
    path = work / f"http-{handoff}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with open(work / f"activator-{handoff}.log", "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "activator", "run", "-c", str(path)], stderr=log,
                                stdout=subprocess.PIPE)
    assert proc.stdout is not None
    while b"ready on" not in (line := proc.stdout.readline()):
        if proc.poll() is not None or not line:
            raise SystemExit(f"activator did not start; see {work / f'activator-{handoff}.log'}")
    return proc


def measure(name: str, port: int, direct: int, args: argparse.Namespace) -> dict[str, Any]:
    wait_listening(port)
    wrk(port, args.warmup)  # wakes it, and JIT-warms it like direct
    runs, beside = [], []
    for _ in range(args.runs):
        runs.append(wrk(port, args.seconds))
        beside.append(wrk(direct, args.seconds))
    r = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
    d = {k: statistics.median(x[k] for x in beside) for k in beside[0]}
    print(f"  {name}: done", flush=True)
    return {"path": name, **r, "x_direct": r["rps"] / d["rps"], "p99_minus_direct_ms": r["p99_ms"] - d["p99_ms"],
            "direct": d}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=10, help="seconds of wrk before each server is measured")
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--paths", default="kernel,handoff")
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("needs wrk (make setup installs it)")
    work = Path(tempfile.mkdtemp(prefix="activator-warm-http-"))
    results = []
    direct_port = free_port()
    root = unpack_image(work, IMAGE)
    direct = start_direct(root, direct_port)
    try:
        wait_listening(direct_port, 180)
        wrk(direct_port, args.warmup)
        for key, handoff in (("kernel", False), ("handoff", True)):
            if key not in args.paths.split(","):
                continue
            port = free_port()
            act = start_activator(work, port, handoff)
            try:
                results.append(measure(f"activator ({key})", port, direct_port, args))
            finally:
                act.terminate()
                act.wait(120)
                time.sleep(1)
    finally:
        direct.terminate()
        direct.wait(60)
        subprocess.run(["umount", "-l", str(root / "proc")], check=False)
        shutil.rmtree(work, ignore_errors=True)
    print(f"\nWarm path over HTTP: wrk -t2 -c32 -d{args.seconds}s against Tomcat, median of {args.runs}; each path's "
          "runs alternated with direct's\n")
    print(f"{'path':20} {'req/s':>9} {'x direct':>8} {'p50 ms':>7} {'p99 ms':>7} {'p99-dir':>8} {'direct req/s':>12}")
    for r in results:
        print(f"{r['path']:20} {r['rps']:9.0f} {r['x_direct']:8.2f} {r['p50_ms']:7.3f} {r['p99_ms']:7.3f} "
              f"{r['p99_minus_direct_ms']:8.3f} {r['direct']['rps']:12.0f}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
