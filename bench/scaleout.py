"""Restore many at once, two ways (the activator runs in-process on uvloop, as `activator run` would):

  tomcat x10   one Tomcat checkpoint, 10 instances restored in parallel: max_instances 10, target 1 connection,
               and 10 clients at once, each keeping its keep-alive connection open so each needs its own
               instance. Reports the time until all 10 have their HTTP 200, the host memory the 10 use
               (MemAvailable before/after, and the sum of the instances' memory cgroups), and each instance's
               own memory from smaps_rollup: USS, PSS and anonymous (under map, the pages it wrote).
  20 services  20 different small services (busybox httpd, one checkpoint each), nothing running, one client
               each at the same moment; the instances are reaped and it is repeated. Reports time to first
               byte p50/p95/p99/max over all of them.

Each is run for every `--restore-memory` (default copy,map; copy: each instance reads the checkpoint's pages into
memory of its own; map: they map them copy-on-write, so pages no instance writes are one page-cache copy:
docs/restore-memory.md) and, for Tomcat, every `--share` (default on,off: KSM on or off), one variant after the
other in the same run.

Loopback only; every loop is bounded. Run as root after `make setup images`:
    .venv/bin/python bench/scaleout.py [--rounds 5] [--skip-tomcat] [--restore-memory copy,map] [--share on,off]
                                       [--slots N]
Prints tables and writes docs/scaleout.json and docs/scaleout.png.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
# the demo's JVM flags (chosen for few dirty pages, see config/demo.yaml)
DEMO_TOMCAT_ENV = yaml.safe_load((ROOT / "config" / "demo.yaml").read_text())["services"]["tomcat"]["environment"]
sys.path.insert(0, str(ROOT))

from activator.config.model import load_config  # noqa: E402
from activator.daemon.server import Activator  # noqa: E402
from activator.runtime import cgroups  # noqa: E402

STATE = Path("/var/lib/activator/bench-scaleout")
TOMCAT = {"image": "activator-demo/tomcat:latest", "port": 8080,
          "environment": DEMO_TOMCAT_ENV,
          "readiness": {"http_path": "/", "timeout": "120s"}}
HELLO = {"image": "activator-demo/busybox:latest", "port": 8080, "command": ["httpd", "-f", "-p", "8080", "-h", "/www"]}
TIMEOUT = 120.0


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no MemAvailable")


def own_memory(name: str) -> tuple[int, int, int]:
    """(USS, PSS, anonymous) in bytes of an instance's processes, from smaps_rollup: USS (private pages) is what
    one more instance costs once sharing has done its work (KSM-merged pages and page-cache pages that other
    instances map too are shared, so not in it); anonymous is the memory it wrote (a mapped restore's
    copy-on-write copies), which no other instance can ever share without KSM."""
    procs = ""
    for f in ("/sys/fs/cgroup/memory/activator/{}/cgroup.procs", "/sys/fs/cgroup/activator/{}/cgroup.procs"):
        with contextlib.suppress(OSError):
            procs = Path(f.format(name)).read_text()
            break
    uss = pss = anon = 0
    for pid in procs.split():
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
                key, _, rest = line.partition(":")
                if key in ("Private_Clean", "Private_Dirty"):
                    uss += int(rest.split()[0]) * 1024
                elif key == "Pss":
                    pss += int(rest.split()[0]) * 1024
                elif key == "Anonymous":
                    anon += int(rest.split()[0]) * 1024
    return uss, pss, anon


async def started(services: dict[str, Any], **settings: Any) -> Activator:
    tmp = Path(tempfile.mkdtemp())
    socks = []
    for s in services.values():
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        sock.listen(1024)
        socks.append(sock)
        s["listen"] = f"127.0.0.1:{sock.getsockname()[1]}"
    cfg = {"settings": {"state_dir": str(STATE), "metrics": None} | settings, "services": services}
    (tmp / "bench.yaml").write_text(yaml.safe_dump(cfg))
    act = Activator(load_config(tmp / "bench.yaml"), sockets=socks)
    await act.startup()
    shutil.rmtree(tmp)
    return act


def port_of(act: Activator, name: str) -> int:
    return int(act.listeners[name][0].getsockname()[1])


async def http_keepalive(port: int) -> tuple[float, asyncio.StreamWriter]:
    """One HTTP/1.1 request on a connection kept open; seconds until the whole response is in."""
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n")
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), TIMEOUT)
    assert head.startswith(b"HTTP/1.1 200"), head[:40]
    length = next(int(ln.split(b":")[1]) for ln in head.split(b"\r\n") if ln.lower().startswith(b"content-length"))
    await asyncio.wait_for(reader.readexactly(length), TIMEOUT)
    return time.monotonic() - t0, writer


async def first_byte(port: int) -> float:
    t0 = time.monotonic()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET / HTTP/1.0\r\nHost: bench\r\n\r\n")
    got = await asyncio.wait_for(reader.read(1), TIMEOUT)
    dt = time.monotonic() - t0
    assert got, "no answer"
    writer.close()
    return dt


async def wait_for(check: Any, what: str, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        await asyncio.sleep(0.05)


def ksmd_cpu() -> float:
    """CPU seconds ksmd has used."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        if "(ksmd)" in text:
            f = text.rsplit(")", 1)[1].split()
            return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return 0.0


async def settled_memory(limit: float = 60.0) -> int:
    """MemAvailable once it has stopped moving (within 8 MiB over 2 s)."""
    t0, last = time.monotonic(), mem_available()
    while time.monotonic() - t0 < limit:
        await asyncio.sleep(2)
        now = mem_available()
        if abs(now - last) < 8 * 2**20:
            return now
        last = now
    return last


async def settle_ksm(limit: float = 90.0) -> float:
    """Until ksmd stops finding new pages to merge (or limit); seconds waited."""
    from activator.runtime import ksm

    t0, last, still = time.monotonic(), -1, 0
    while time.monotonic() - t0 < limit and still < 4:
        await asyncio.sleep(1)
        now = ksm.stats().get("pages_sharing", 0)
        still = still + 1 if now == last else 0
        last = now
    return time.monotonic() - t0


async def bench_tomcat(n: int, share: bool, memory: str, slots: int = 1) -> dict[str, Any]:
    act = await started({"tomcat": TOMCAT | {"max_instances": n, "target_connections": 1, "idle_timeout": "10m",
                                             "share_memory": share, "restore_memory": memory,
                                             "prepared_slots": slots}})
    if slots > 1:  # the slots are made behind the checkpoint: all of them, before the clients come
        launcher = act.services["tomcat"].launcher
        await wait_for(lambda: len(getattr(launcher, "slots", ())) >= slots, "prepared slots")
    try:
        svc = act.services["tomcat"]
        ck = svc.checkpoint
        assert ck is not None
        before = await settled_memory()  # the previous run's instances may still be being freed
        t0 = time.monotonic()
        results = await asyncio.gather(*(http_keepalive(port_of(act, "tomcat")) for _ in range(n)))
        all_served = time.monotonic() - t0
        cpu0 = ksmd_cpu()
        if share:
            waited = await settle_ksm()
        else:
            await asyncio.sleep(1)
            waited = 1.0
        used_host = before - mem_available()
        charged = [cgroups.memory_bytes(i.name) or 0 for i in svc.instances]
        own = [own_memory(i.name) for i in svc.instances]
        from activator.runtime import ksm

        out = {
            "instances": len(svc.instances), "all_served_s": all_served, "share_memory": share,
            "restore_memory": memory, "prepared_slots": slots,
            "per_client_s": sorted(r[0] for r in results),
            "restore_s": sorted(i.start_seconds for i in svc.instances),
            "host_memory_bytes": used_host, "cgroup_memory_bytes": sum(charged),
            "uss_bytes": sorted(u for u, _, _ in own), "pss_bytes": sorted(p for _, p, _ in own),
            "anon_bytes": sorted(a for _, _, a in own),
            "checkpoint_pages_bytes": ck.pages_bytes, "settle_s": waited,
            "ksmd_cpu_s": ksmd_cpu() - cpu0, "ksm": ksm.stats(),
        }
        if share:  # and once merged, what does ksmd cost per second at its slow pace?
            await asyncio.sleep(35)  # past the fast phase
            c1 = ksmd_cpu()
            await asyncio.sleep(10)
            out["ksmd_idle_cpu_share"] = (ksmd_cpu() - c1) / 10
        for _, w in results:
            w.close()
        return out
    finally:
        await act.shutdown()


async def bench_many(n: int, rounds: int, memory: str) -> dict[str, Any]:
    names = [f"hello{i:02d}{memory}" for i in range(n)]
    act = await started({name: HELLO | {"idle_timeout": "300ms", "restore_memory": memory} for name in names})
    try:
        samples: list[float] = []
        cpu = 0.0
        for _ in range(rounds):
            await wait_for(lambda: not any(s.instances or s._starts for s in act.services.values()), "reap")
            before = _cpu_seconds()
            samples += await asyncio.gather(*(first_byte(port_of(act, name)) for name in names))
            cpu += _cpu_seconds() - before
        return {"services": n, "rounds": rounds, "ttfb_s": sorted(samples), "cpu_per_restore_s": cpu / n / rounds,
                "restore_memory": memory}
    finally:
        await act.shutdown()


def pct(xs: list[float], p: float) -> float:
    return sorted(xs)[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--instances", type=int, default=10)
    ap.add_argument("--services", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--skip-tomcat", action="store_true")
    ap.add_argument("--skip-many", action="store_true")
    ap.add_argument("--restore-memory", default="copy,map",
                    help="restore_memory: copy, map, or both (the default: copy,map)")
    ap.add_argument("--share", default="on,off", help="Tomcat with KSM on, off, or both (the default: on,off)")
    ap.add_argument("--slots", type=int, default=1,
                    help="Tomcat's prepared_slots (up to 16): instances made ready but for their process ahead")
    ap.add_argument("--out", default=str(ROOT / "docs" / "scaleout.json"))
    args = ap.parse_args()
    import uvloop

    memories = args.restore_memory.split(",")
    shares = [{"on": True, "off": False}[x] for x in args.share.split(",")]
    results: dict[str, Any] = {}
    if not args.skip_tomcat:
        for memory in memories:
            for share in shares:
                key = f"tomcat-{memory}" + ("-shared" if share else "")
                t = results[key] = uvloop.run(bench_tomcat(args.instances, share, memory, args.slots))
                _print_tomcat(t, args.instances)
    if not args.skip_many:
        for memory in memories:
            m = results[f"many-{memory}"] = uvloop.run(bench_many(args.services, args.rounds, memory))
            ms = [x * 1000 for x in m["ttfb_s"]]
            print(f"\n{m['services']} different small services restored at once, {m['rounds']} rounds "
                  f"({len(ms)} first connections), restore_memory {memory}, time to first byte in ms")
            print(f"  {'p50':>8} {'p95':>8} {'p99':>8} {'max':>8}")
            print(f"  {pct(ms, 50):8.0f} {pct(ms, 95):8.0f} {pct(ms, 99):8.0f} {max(ms):8.0f}")
            print(f"  CPU per restore (activator + runc + CRIU): {m['cpu_per_restore_s'] * 1000:.0f} ms "
                  f"on {_cpus()} CPUs: {m['services']} at once cannot finish before "
                  f"~{m['cpu_per_restore_s'] * m['services'] / _cpus() * 1000:.0f} ms")
    Path(args.out).write_text(json.dumps(results, indent=1))
    _chart(results, Path(args.out).with_suffix(".png"))


def _print_tomcat(t: dict[str, Any], n: int) -> None:
    ms = [x * 1000 for x in t["restore_s"]]
    share = t["share_memory"]
    print(f"\nTomcat: {t['instances']} instances from one checkpoint, restored in parallel on {_cpus()} CPUs, "
          f"restore_memory {t['restore_memory']}, share_memory {'on' if share else 'off'}, "
          f"prepared_slots {t['prepared_slots']}")
    print(f"  all {n} served (HTTP 200) after   {t['all_served_s'] * 1000:8.0f} ms")
    print(f"  per-instance restore, median / max     {statistics.median(ms):8.0f} / {max(ms):.0f} ms")
    pages = t["checkpoint_pages_bytes"]
    per = t["host_memory_bytes"] / t["instances"]
    print(f"  host memory used (MemAvailable drop)   {t['host_memory_bytes'] / 2**20:8.0f} MiB "
          f"({per / 2**20:.0f} MiB per instance, {per / pages:.0%} of the checkpoint's pages)")
    print(f"  instances' memory cgroups, sum         {t['cgroup_memory_bytes'] / 2**20:8.0f} MiB")
    print(f"  checkpoint pages (copy: read by each)  {pages / 2**20:8.0f} MiB")
    if t.get("uss_bytes"):
        print(f"  per instance, its own pages (USS)      {statistics.median(t['uss_bytes']) / 2**20:8.1f} MiB "
              f"median (PSS {statistics.median(t['pss_bytes']) / 2**20:.1f} MiB, anonymous (map: written) "
              f"{statistics.median(t['anon_bytes']) / 2**20:.1f} MiB; smaps_rollup)")
    if share:
        print(f"  ksmd: merged within {t['settle_s']:.0f} s using {t['ksmd_cpu_s']:.1f} s of CPU; "
              f"then {t.get('ksmd_idle_cpu_share', 0):.1%} of a CPU at the slow pace")


def _cpu_seconds() -> float:
    """CPU used by this process and its finished children (runc, CRIU)."""
    import resource

    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + kids.ru_utime + kids.ru_stime


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


def _chart(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tomcats = [k for k in results if k.startswith("tomcat")]
    manys = [k for k in results if k.startswith("many")]
    panels = [p for p in ("tomcat", "many") if (tomcats if p == "tomcat" else manys)]
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 4), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        if panel == "tomcat":
            for i, key in enumerate(tomcats):
                xs = [x * 1000 for x in results[key]["per_client_s"]]
                width = 0.8 / len(tomcats)
                ax.bar([j + 1 + i * width for j in range(len(xs))], xs, width=width, label=key)
            ax.set_title("Tomcat from one checkpoint:\ntime until each client had its 200")
            ax.set_xlabel("client (sorted)")
            ax.set_ylabel("ms")
        else:
            for key in manys:
                ax.hist([x * 1000 for x in results[key]["ttfb_s"]], bins=20, alpha=0.6, label=key)
            ax.set_title(f"{results[manys[0]]['services']} services at once: time to first byte")
            ax.set_xlabel("ms")
            ax.set_ylabel("connections")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    print(f"\nchart: {path}")


if __name__ == "__main__":
    main()
