"""Warm path: real clients at real concurrency against the same server, four ways side by side, in one run.

  direct                 redis-server / iperf3 from the demo image's own root filesystem (chroot), on host
                         loopback: no proxy, no container network
  activator (kernel)     the image restored by `activator run` (network: bridge): connections steered to the
                         instance by nftables DNAT over a veth, bytes never cross the daemon
  activator (handoff)    handoff: true: the app accepts from the activator's own listening socket, put into the
                         restored process by CRIU; no NAT, no veth, no copy
  activator (userspace)  the same with network: none: every byte spliced through the daemon (asyncio on uvloop)
  systemd-socket-proxyd  in front of the direct server (socket-activated, as systemd would run it)

Loads: redis-benchmark GET at -c 1 and -c 32 (requests/s, p50 and p99 latency) and iperf3 bulk (one stream,
Gbit/s). Loopback and the project's own bridge only; every load is bounded by count or time.
Run as root after `make setup` and `scripts/build-images.sh redis`:
    .venv/bin/python bench/warmpath.py [--requests N] [--seconds S] [--runs R]
Prints a table (the median of R runs per cell), writes docs/warmpath.json and docs/warmpath.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
IMAGE = "activator-demo/redis:latest"
STATE = Path("/var/lib/activator/bench-warm")
EXTRA: dict[str, Any] = {}  # --service: more keys for both services (what a sandbox setting costs)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, deadline: float = 120) -> None:
    """Until something listens on port; read from ss, not probed (iperf3's server dies of a bare connection)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < deadline:
        if subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout.strip():
            return
        time.sleep(0.05)
    raise TimeoutError(port)


def redis(port: int, clients: int, requests: int) -> dict[str, float]:
    out = subprocess.run(["redis-benchmark", "-h", "127.0.0.1", "-p", str(port), "-t", "get", "-n", str(requests),
                          "-c", str(clients), "--csv", "--precision", "3"],
                         capture_output=True, text=True, timeout=300, check=True).stdout
    row = next(r for r in csv.DictReader(io.StringIO(out)) if r["test"].startswith("GET"))
    return {"rps": float(row["rps"]), "p50_ms": float(row["p50_latency_ms"]), "p99_ms": float(row["p99_latency_ms"])}


def iperf(port: int, seconds: int) -> float:
    out = subprocess.run(["iperf3", "-c", "127.0.0.1", "-p", str(port), "-t", str(seconds), "-J"],
                         capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    return float(json.loads(out)["end"]["sum_received"]["bits_per_second"]) / 1e9


def unpack_image(work: Path, image: str = IMAGE) -> Path:
    """The image's root filesystem under work/rootfs, owners as the image has them (numbers, not names: a host
    user of the same name may have another uid)."""
    root = work / "rootfs"
    root.mkdir()
    cid = subprocess.run(["docker", "create", image], capture_output=True, text=True, check=True).stdout.strip()
    try:
        subprocess.run(f"docker export {cid} | tar --numeric-owner -x -C {root}", shell=True, check=True)
    finally:
        subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    return root


def start_activator(work: Path, redis_port: int, iperf_port: int, network: str,
                    handoff: bool = False) -> subprocess.Popen[bytes]:
    cfg = {"settings": {"state_dir": str(STATE), "metrics": None, "network": {"bridge": "actbench0",
                                                                              "subnet": "10.89.250.0/24"}},
           "services": {
               "redis": {"image": IMAGE, "port": 6379, "listen": f"127.0.0.1:{redis_port}", "idle_timeout": "1h",
                         "network": network, "max_instances": 1, "handoff": handoff, **EXTRA},
               "iperf": {"image": IMAGE, "command": ["iperf3", "-s", "-p", "5201"], "port": 5201,
                         "listen": f"127.0.0.1:{iperf_port}", "idle_timeout": "1h", "network": network,
                         "handoff": handoff, **EXTRA},
           }}
    tag = f"{network}{'-handoff' if handoff else ''}"
    path = work / f"warm-{tag}.yaml"
    path.write_text(yaml.safe_dump(cfg))
    with open(work / f"activator-{tag}.log", "wb") as log:  # the child keeps its own copy
        proc = subprocess.Popen([sys.executable, "-m", "activator", "run", "-c", str(path)], stderr=log,
                                stdout=subprocess.PIPE)
    assert proc.stdout is not None
    while b"metrics" not in (line := proc.stdout.readline()) and b"ready on" not in line:
        if proc.poll() is not None or not line:
            raise SystemExit("activator did not start")
    return proc


def measure(name: str, redis_port: int, iperf_port: int, args: argparse.Namespace,
            direct: tuple[int, int] | None = None) -> dict[str, Any]:
    """Each cell the median of args.runs; with `direct` (its redis port and iperf port), direct's runs alternate
    with this path's, so that the ratio compares the two under the same load of this noisy VM."""
    wait_listening(redis_port)
    wait_listening(iperf_port)
    redis(redis_port, 1, 200)  # wakes the service (a restore) and warms up
    iperf(iperf_port, 1)
    r: dict[str, Any] = {"path": name}
    for c in (1, 32):
        runs, beside = [], []
        for _ in range(args.runs):
            runs.append(redis(redis_port, c, args.requests))
            if direct is not None:
                beside.append(redis(direct[0], c, args.requests))
        r[f"c{c}"] = {k: statistics.median(x[k] for x in runs) for k in runs[0]}
        if beside:
            d = {k: statistics.median(x[k] for x in beside) for k in beside[0]}
            r[f"c{c}"]["x_direct"] = r[f"c{c}"]["rps"] / d["rps"]
            r[f"c{c}"]["p99_minus_direct_ms"] = r[f"c{c}"]["p99_ms"] - d["p99_ms"]
    r["bulk_gbit"] = statistics.median(iperf(iperf_port, args.seconds) for _ in range(args.runs))
    print(f"  {name}: done", flush=True)
    return r


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=100_000)
    ap.add_argument("--seconds", type=int, default=3)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "docs"), help="where warmpath.json and warmpath.png go")
    ap.add_argument("--paths", default="proxyd,kernel,handoff,userspace",
                    help="which paths besides direct, comma-separated (default: all)")
    ap.add_argument("--service", default="{}", help='more service keys, JSON (e.g. \'{"seccomp": "unconfined"}\')')
    args = ap.parse_args()
    EXTRA.update(json.loads(args.service))
    for tool in ("redis-benchmark", "iperf3", "/lib/systemd/systemd-socket-proxyd"):
        if shutil.which(tool) is None:
            raise SystemExit(f"needs {tool} (make setup installs it)")
    work = Path(tempfile.mkdtemp(prefix="activator-warm-"))
    root = unpack_image(work)
    results = []
    procs: list[subprocess.Popen[bytes]] = []
    try:
        rp, ip = free_port(), free_port()
        procs.append(subprocess.Popen(["chroot", str(root), "redis-server", "--port", str(rp), "--bind", "127.0.0.1",
                                       "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL))
        procs.append(subprocess.Popen(["chroot", str(root), "iperf3", "-s", "-p", str(ip)],
                                      stdout=subprocess.DEVNULL))
        results.append(measure("direct", rp, ip, args))

        paths = args.paths.split(",")
        if "proxyd" in paths:
            prp, pip = free_port(), free_port()
            for listen, target in ((prp, rp), (pip, ip)):
                procs.append(subprocess.Popen(["systemd-socket-activate", "-l", f"127.0.0.1:{listen}",
                                               "/lib/systemd/systemd-socket-proxyd", f"127.0.0.1:{target}"],
                                              stderr=subprocess.DEVNULL))
            results.append(measure("systemd-socket-proxyd", prp, pip, args, (rp, ip)))

        for key, network, handoff, name in (("kernel", "bridge", False, "activator (kernel)"),
                                            ("handoff", "bridge", True, "activator (handoff)"),
                                            ("userspace", "none", False, "activator (userspace)")):
            if key not in paths:
                continue
            arp, aip = free_port(), free_port()
            act = start_activator(work, arp, aip, network, handoff)
            try:
                results.append(measure(name, arp, aip, args, (rp, ip)))
            except Exception:  # what the daemon said, with the client's failure
                tag = f"{network}{'-handoff' if handoff else ''}"
                log = (work / f"activator-{tag}.log").read_text(errors="replace").splitlines()
                print("\n".join(log[-15:]), file=sys.stderr)
                raise
            finally:
                act.terminate()
                act.wait(120)
    finally:
        for p in reversed(procs):
            p.terminate()
            p.wait(60)
        shutil.rmtree(work, ignore_errors=True)
    report(results, args)


def report(results: list[dict[str, Any]], args: argparse.Namespace) -> None:
    direct = results[0]
    print(f"\nWarm path, redis-benchmark GET x {args.requests} and iperf3 {args.seconds}s; median of {args.runs}\n")
    print(f"{'path':24} {'c=1 req/s':>10} {'p50 ms':>7} {'p99 ms':>7} {'c=32 req/s':>11} {'x direct':>8} "
          f"{'p50 ms':>7} {'p99 ms':>7} {'p99-dir':>7} {'bulk Gbit/s':>11}")
    for r in results:
        c1, c32 = r["c1"], r["c32"]
        print(f"{r['path']:24} {c1['rps']:10.0f} {c1['p50_ms']:7.3f} {c1['p99_ms']:7.3f} {c32['rps']:11.0f} "
              f"{c32.get('x_direct', c32['rps'] / direct['c32']['rps']):8.2f} {c32['p50_ms']:7.3f} "
              f"{c32['p99_ms']:7.3f} {c32.get('p99_minus_direct_ms', 0.0):7.3f} {r['bulk_gbit']:11.1f}")
    print("\nx direct and p99-dir: against direct's runs alternated with that path's (same minutes of the VM)")
    docs = Path(args.out)
    (docs / "warmpath.json").write_text(json.dumps(results, indent=1))
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    names = [r["path"] for r in results]
    colors = ["#555555", "#999999", "#2a7ab9", "#3aa655", "#e07b39"][: len(names)]
    for ax, (title, values, unit) in zip(axes, (
            ("redis GET, 1 client", [r["c1"]["rps"] / 1000 for r in results], "k req/s"),
            ("redis GET, 32 clients", [r["c32"]["rps"] / 1000 for r in results], "k req/s"),
            ("iperf3 bulk, 1 stream", [r["bulk_gbit"] for r in results], "Gbit/s")), strict=True):
        ax.bar(range(len(names)), values, color=colors)
        labels = [n.replace(" (", "\n(").replace("socket-proxyd", "socket-\nproxyd") for n in names]
        ax.set_xticks(range(len(names)), labels, fontsize=8)
        ax.set_title(title)
        ax.set_ylabel(unit)
    fig.suptitle("activator warm path vs direct and systemd-socket-proxyd (loopback, 2-core VM)")
    fig.tight_layout()
    fig.savefig(docs / "warmpath.png", dpi=110)
    print(f"\nchart: {docs / 'warmpath.png'}")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
