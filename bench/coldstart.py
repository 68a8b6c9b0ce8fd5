"""Cold path: time from connect to the first response byte, for the demo apps, three ways side by side.

  activator   a connection to `activator run` while nothing of the service runs (restore from checkpoint)
  docker run  `docker run -d -p ...` of the same image, then the first request that gets an answer
  runc run    `runc run -d` of the same root filesystem and spec (what the activator cold-starts with), then
              the first answer

Every measurement starts from nothing running. Traffic goes to loopback or to namespaces this script made.
Run as root after `make setup images`:  .venv/bin/python bench/coldstart.py [--runs N] [--restore-memory copy,map]
Prints a table (median, min, max in ms), each activator row's ratio to a cold `docker run` and `runc run` in the
same run, and writes docs/coldstart.png (and its numbers beside it, docs/coldstart.json). `--restore-memory`
(default copy) gives activator a row per choice (restore_memory: copy reads the checkpoint's pages into the
instance, map maps them copy-on-write: docs/restore-memory.md), measured one after the other.

    .venv/bin/python bench/coldstart.py --breakdown [--runs N] [--apps hello,tomcat] [--userns private,host]
                                        [--restore-memory copy,map] [--first N] [--drop-caches]
                                        [--keep-logs DIR] [--jvm NAME=FLAGS ...]

instead restores each app N times in-process and prints where a restore's time goes: what activator still does
on the critical path (prepared slots do the namespace, network, overlay and bundle ahead), the restore call (one
CRIU RPC to a waiting `criu swrk` on cgroup-v1 hosts, `runc restore` otherwise) and within it CRIU's own
restore time from its stats-restore image, the pages it restored and those it mapped (`mapped`, CRIU's
nr_mapped_pages: 0 under copy), the app's page faults by the end of its first answer (CRIU's own copying in
counted too), and the connect-to-first-byte time seen by a client. Variants (userns, restore_memory) are
alternated run by run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# the demo's JVM flags (chosen for few dirty pages, see config/demo.yaml)
DEMO_TOMCAT_ENV = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())["services"]["tomcat"]["environment"]
STATE = Path("/var/lib/activator/bench")
APPS: dict[str, dict[str, Any]] = {
    "tomcat": {"image": "activator-demo/tomcat:latest", "port": 8080,
               "environment": DEMO_TOMCAT_ENV,
               "readiness": {"http_path": "/", "timeout": "120s"}},
    "hello": {"image": "activator-demo/busybox:latest", "port": 8080,
              "command": ["httpd", "-f", "-p", "8080", "-h", "/www"]},
}
REQUEST = b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n"
DEADLINE = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def first_byte(port: int, t0: float, connect: object = None) -> float:
    """Retry connect+GET until a byte comes back; seconds since t0."""
    while time.monotonic() - t0 < DEADLINE:
        try:
            s = connect() if callable(connect) else socket.create_connection(("127.0.0.1", port), timeout=30)
            s.setblocking(True)
            s.settimeout(30)
            with s:
                if callable(connect):
                    s.connect(("127.0.0.1", port))
                s.sendall(REQUEST)
                if s.recv(1):
                    return time.monotonic() - t0
        except OSError:
            pass
        time.sleep(0.005)
    raise TimeoutError("no answer")


def scrape(metrics_port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
        return str(r.read().decode())


def bench_activator(runs: int, memory: str = "copy") -> dict[str, list[float]]:
    ports = {name: free_port() for name in APPS}
    metrics_port = free_port()
    cfg = {
        "settings": {"state_dir": str(STATE), "metrics": f"127.0.0.1:{metrics_port}"},
        "services": {name: app | {"listen": f"127.0.0.1:{ports[name]}", "idle_timeout": "300ms",
                                  "restore_memory": memory}
                     for name, app in APPS.items()},
    }
    path = Path(tempfile.mkdtemp()) / "bench.yaml"
    path.write_text(yaml.safe_dump(cfg))
    out: dict[str, list[float]] = {name: [] for name in APPS}
    with subprocess.Popen([sys.executable, "-m", "activator", "run", "-c", str(path)],
                          stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True) as proc:
        assert proc.stdout is not None
        while "metrics on" not in proc.stdout.readline():
            if proc.poll() is not None:
                raise SystemExit("activator did not start")
        try:
            for name in APPS:
                for _ in range(runs):
                    t0 = time.monotonic()
                    out[name].append(first_byte(ports[name], t0))
                    deadline = time.monotonic() + 30
                    while f'activator_instances{{service="{name}"}} 0.0' not in scrape(metrics_port):
                        assert time.monotonic() < deadline, "instance was not reaped"
                        time.sleep(0.05)
                    time.sleep(1)  # the reaped instance's teardown (runc delete, unmount) runs on after the gauge
        finally:
            proc.terminate()
            proc.wait(60)
    return out


def bench_docker(runs: int) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {name: [] for name in APPS}
    for name, app in APPS.items():
        for _ in range(runs):
            port = free_port()
            cmd = ["docker", "run", "-d", "--rm", "-p", f"127.0.0.1:{port}:{app['port']}"]
            for k, v in app.get("environment", {}).items():
                cmd += ["-e", f"{k}={v}"]
            cmd += [str(app["image"]), *app.get("command", [])]
            t0 = time.monotonic()
            cid = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()
            try:
                out[name].append(first_byte(port, t0))
            finally:
                subprocess.run(["docker", "rm", "-f", cid], capture_output=True)
    return out


def bench_runc(runs: int) -> dict[str, list[float]]:
    """runc run of the checkpoint's own process spec and image root, in a namespace made for it."""
    sys.path.insert(0, str(ROOT))
    from activator.checkpoints.store import CheckpointStore
    from activator.config.model import Resources
    from activator.runtime.runc import Runc
    from activator.runtime.sandbox import Sandbox, new_name
    from activator.statedir import StateDir

    store = CheckpointStore(StateDir(STATE))
    runc = Runc(STATE / "runc-bench")
    out: dict[str, list[float]] = {name: [] for name in APPS}

    async def one(name: str) -> float:
        ck = store.load(name)
        assert ck is not None, "run the activator bench first: it builds the checkpoints"
        sb = Sandbox(new_name(name + "-bench"), STATE / "instances-bench", runc)
        t0 = time.monotonic()
        try:
            await sb.prepare([ck.image_rootfs], ck.process, Resources(), name, ck.seccomp)
            sb.write_etc(name)
            with open("/dev/null", "wb") as null:  # noqa: ASYNC230 - /dev/null never blocks
                await sb.start(stdout=null.fileno(), stderr=null.fileno())
            port = int(APPS[name]["port"])
            return await asyncio.to_thread(first_byte, port, t0, sb.netns.socket)
        finally:
            await sb.release()

    for name in APPS:
        for _ in range(runs):
            out[name].append(asyncio.run(one(name)))
    return out


def mapped_pages(log: Path) -> int:
    """Pages CRIU mapped from the images instead of reading them (patch 0003's nr_mapped_pages, per task)."""
    if not log.exists():
        return 0
    return sum(int(line.rsplit(None, 1)[-1]) for line in log.read_text(errors="replace").splitlines()
               if "nr_mapped_pages:" in line)


def minor_faults(pid: int | None) -> int:
    """Page faults the app's threads took so far (each thread's minflt: a process's own counts only threads
    that have exited); the restore's own writes (CRIU copying pages in) are counted too."""
    total = 0
    for stat in Path(f"/proc/{pid}/task").glob("*/stat") if pid else ():
        try:
            total += int(stat.read_text().rsplit(")", 1)[1].split()[7])
        except (OSError, IndexError, ValueError):
            continue
    return total


async def one_request(port: int) -> float:
    """One whole request on a new connection to the service (the instance is running): seconds."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(REQUEST)
    await reader.read()
    writer.close()
    return time.monotonic() - t0


def breakdown(runs: int, apps: list[str], userns: list[str], memory: list[str],
              keep_logs: Path | None = None, first: int = 0, drop_caches: bool = False) -> None:
    """In-process restores, phase by phase (medians over the runs after the first two), for each `userns`
    setting asked for (private: the default, the app in a user namespace of its own; host: none) and each
    `restore_memory` (copy, map), the variants alternated run by run so a noisy spell hits them alike."""
    import socket as socketmod

    import uvloop

    sys.path.insert(0, str(ROOT))
    from activator.checkpoints.store import _load_img
    from activator.config.model import load_config
    from activator.daemon.server import Activator

    async def run() -> dict[str, list[dict[str, float]]]:
        work = Path(tempfile.mkdtemp(prefix="activator-breakdown-"))
        socks, services = {}, {}
        variants = [(app, u, m) for app in apps for u in userns for m in memory]
        names = ["-".join([app] + ([u] if len(userns) > 1 else []) + ([m] if len(memory) > 1 else []))
                 for app, u, m in variants]
        for name, (app, u, m) in zip(names, variants, strict=True):
            s = socketmod.socket()
            s.setsockopt(socketmod.SOL_SOCKET, socketmod.SO_REUSEADDR, 1)
            s.bind(("127.0.0.1", 0))
            s.listen(64)
            socks[name] = s
            services[name] = APPS[app] | {"listen": f"127.0.0.1:{s.getsockname()[1]}", "idle_timeout": "200ms",
                                          "userns": u, "restore_memory": m}
        (work / "b.yaml").write_text(yaml.safe_dump({"settings": {"state_dir": str(STATE), "metrics": None},
                                                     "services": services}))
        act = Activator(load_config(work / "b.yaml"), sockets=list(socks.values()))
        await act.startup()
        rows: dict[str, list[dict[str, float]]] = {name: [] for name in names}
        try:
            for _ in range(runs):
                for name in names:
                    svc = act.services[name]
                    if drop_caches:  # the checkpoint's pages come from disk: a mapped restore's faults read them
                        os.sync()
                        Path("/proc/sys/vm/drop_caches").write_text("3\n")
                    t0 = time.monotonic()
                    reader, writer = await asyncio.open_connection("127.0.0.1", socks[name].getsockname()[1])
                    writer.write(REQUEST)
                    await reader.read(1)
                    ttfb = time.monotonic() - t0
                    await reader.read()
                    writer.close()
                    inst = svc.instances[0]
                    faults = minor_faults(inst.sandbox.pid_now())
                    after = [await one_request(socks[name].getsockname()[1]) for _ in range(first)]
                    row = {k: v * 1000 for k, v in inst.phases.as_dict().items()} | {"ttfb": ttfb * 1000,
                                                                                         "faults": faults}
                    if after:
                        row |= {f"next{first} p50": statistics.median(after) * 1000,
                                f"next{first} p99": sorted(after)[max(0, int(len(after) * 0.99) - 1)] * 1000}
                    stats = inst.sandbox.layout.criu_work / "stats-restore"
                    if stats.exists():
                        st = _load_img(stats)["entries"][0]["restore"]
                        row |= {"criu restore": st.get("restore_time", 0) / 1000,
                                "pages": st.get("pages_restored", 0) + st.get("pages_compared", 0)}
                    log = inst.sandbox.layout.criu_work / "restore.log"
                    row["mapped"] = mapped_pages(log)
                    if keep_logs is not None and log.exists():
                        keep_logs.mkdir(parents=True, exist_ok=True)
                        shutil.copy(log, keep_logs / f"{name}-{len(rows[name])}.log")
                    rows[name].append(row)
                    while svc.instances or svc._stopping:
                        await asyncio.sleep(0.02)
        finally:
            await act.shutdown()
        return rows

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        results = r.run(run())
    cols = ["prepare", "restore", "criu restore", "ttfb", "pages", "mapped", "faults"]
    if first:
        cols += [f"next{first} p50", f"next{first} p99"]
    print(f"\nWhere a restore's time goes, ms (median of {max(1, runs - 2)}; 'restore' is the whole restore call,\n"
          "'criu restore' CRIU's own figure inside it; ttfb is what the client saw)\n")
    print(f"{'app':20} " + " ".join(f"{c:>13}" for c in cols))
    for name, rows in results.items():
        rows = rows[2:] or rows
        med = {c: statistics.median(r.get(c, 0) for r in rows) for c in cols}
        print(f"{name:20} " + " ".join(f"{med[c]:13.0f}" if c in ("pages", "mapped", "faults") else f"{med[c]:13.1f}"
                                       for c in cols))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--chart", default=str(ROOT / "docs" / "coldstart.png"))
    ap.add_argument("--breakdown", action="store_true", help="phase by phase, in-process (see above)")
    ap.add_argument("--apps", default=",".join(APPS))
    ap.add_argument("--userns", default="private",
                    help="with --breakdown: private, host, or both (private,host) side by side")
    ap.add_argument("--restore-memory", default="copy",
                    help="restore_memory: copy (the default), map, or both (copy,map) side by side (with --breakdown: "
                         "alternated run by run); map-always too")
    ap.add_argument("--first", type=int, default=0, metavar="N",
                    help="with --breakdown: after the first byte, N more requests one by one (new connections) "
                         "to the restored instance: their p50 and p99 (where a restore's deferred costs, such as "
                         "copy-on-write faults of mapped memory, show)")
    ap.add_argument("--drop-caches", action="store_true",
                    help="with --breakdown: drop the host's page cache before each restore (host-wide; slow)")
    ap.add_argument("--keep-logs", type=Path, default=None, metavar="DIR",
                    help="with --breakdown: keep each restore's CRIU log (timestamped lines) in DIR")
    ap.add_argument("--jvm", action="append", default=[], metavar="NAME=FLAGS",
                    help="with --breakdown: also the demo Tomcat with FLAGS added to its JAVA_OPTS, as app "
                         "tomcat_NAME (repeatable), e.g. --jvm 'xmn=-Xmn2m'")
    args = ap.parse_args()
    apps = args.apps.split(",")
    for variant in args.jvm:
        name, _, flags = variant.partition("=")
        env = DEMO_TOMCAT_ENV | {"JAVA_OPTS": f"{DEMO_TOMCAT_ENV['JAVA_OPTS']} {flags}"}
        APPS[f"tomcat_{name}"] = APPS["tomcat"] | {"environment": env}
        apps.append(f"tomcat_{name}")
    if args.breakdown:
        breakdown(max(3, args.runs), apps, args.userns.split(","), args.restore_memory.split(","), args.keep_logs,
                  min(args.first, 10_000), args.drop_caches)
        return
    memories = args.restore_memory.split(",")
    results = {f"activator (restore, {m})" if len(memories) > 1 else "activator (restore)":
               bench_activator(args.runs, m) for m in memories}
    results |= {"docker run": bench_docker(args.runs), "runc run": bench_runc(args.runs)}
    print(f"\nTime to first byte, ms ({args.runs} runs each)\n")
    print(f"{'app':8} {'path':28} {'median':>8} {'min':>8} {'max':>8}")
    for way, per_app in results.items():
        for app, xs in per_app.items():
            ms = [x * 1000 for x in xs]
            print(f"{app:8} {way:28} {statistics.median(ms):8.1f} {min(ms):8.1f} {max(ms):8.1f}")
    print("\nIn this run: how many times faster than a cold start (medians)\n")
    print(f"{'app':8} {'path':28} {'x docker run':>13} {'x runc run':>11}")
    for way, per_app in results.items():
        if way.startswith("activator"):
            for app, xs in per_app.items():
                mine = statistics.median(xs)
                print(f"{app:8} {way:28} {statistics.median(results['docker run'][app]) / mine:13.1f} "
                      f"{statistics.median(results['runc run'][app]) / mine:11.2f}")
    (Path(args.chart).with_suffix(".json")).write_text(json.dumps(results, indent=1))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(APPS), figsize=(10, 4))
    for ax, app in zip(axes, APPS, strict=True):
        ways = list(results)
        med = [statistics.median(results[w][app]) * 1000 for w in ways]
        ax.bar(ways, med, color=[*["#2a7", "#7c4"][:len(ways) - 2], "#48c", "#888"])  # activator's, docker, runc
        ax.set_title(f"{app}: time to first byte (median)")
        ax.set_ylabel("ms")
        for i, v in enumerate(med):
            ax.text(i, v, f"{v:.0f}", ha="center", va="bottom")
        ax.tick_params(axis="x", labelrotation=15)
    fig.tight_layout()
    Path(args.chart).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.chart, dpi=100)
    print(f"\nchart: {args.chart}")


if __name__ == "__main__":
    main()
