"""cgroup v1 and v2 side by side, in the same emulated machine: the VM of scripts/vm/run booted once as a v1
hybrid (systemd.unified_cgroup_hierarchy=0) and once as a pure v2 host, the same measurements in each.

  restore, <path>   connect -> first byte of a GET to the busybox "hello" app with nothing running: restored from
                    its checkpoint through each restore path the host offers (direct: one CRIU RPC, the instance
                    cgroup made by activator; runc: `runc restore`); the restore call's own time beside it
  standby thaw      connect -> first byte when the first connection thaws a frozen standby (bench/standby.py),
                    and the thaw itself as the daemon logged it

QEMU runs under TCG here (10-30x slower than this host): only the ratio between the v1 and v2 rows means
anything, never the absolute figures.
    .venv/bin/python bench/cgroupvm.py [--runs N]          boots the VM twice (~5 min each), prints one table
    .venv/bin/python bench/cgroupvm.py --inside [--runs N] the measurements alone, on this host (what the VM runs;
                                                           bench/smoke.py runs it so, with one run)
Traffic stays on loopback (and inside the VM, which has no network device).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml
from coldstart import APPS, REQUEST

ROOT = Path(__file__).resolve().parents[1]
PATHS = ("direct", "runc")


def restores(path: str, runs: int) -> dict[str, list[float]] | None:
    """ttfb and the restore call (ms) for `runs` restores of hello through path; None where the host has no such
    path (the direct restore needs cgroups the activator can make and device rules it can write)."""
    import uvloop

    sys.path.insert(0, str(ROOT))
    from activator.config.model import load_config
    from activator.daemon.server import Activator
    from activator.runtime import cgroups

    if path == "runc":
        # What a host that cannot make the instance cgroups says (as tests/engine/test_sandbox.py does).
        cgroups.direct = lambda: False
    elif not cgroups.direct():
        return None

    async def run() -> dict[str, list[float]]:
        work = Path(tempfile.mkdtemp(prefix="activator-cgroupvm-"))
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", 0))
        s.listen(64)
        port = s.getsockname()[1]
        svc_def = APPS["hello"] | {"listen": f"127.0.0.1:{port}", "idle_timeout": "200ms"}
        (work / "b.yaml").write_text(yaml.safe_dump({"settings": {"state_dir": str(work / "state"), "metrics": None},
                                                     "services": {"hello": svc_def}}))
        act = Activator(load_config(work / "b.yaml"), sockets=[s])
        await act.startup()
        got: dict[str, list[float]] = {"ttfb": [], "restore": []}
        phases: dict[str, list[float]] = {}  # every phase of the instance's start, to place what is outside the call
        try:
            svc = act.services["hello"]
            for _ in range(runs):
                t0 = time.monotonic()
                reader, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.write(REQUEST)
                await asyncio.wait_for(reader.read(1), 300)
                got["ttfb"].append((time.monotonic() - t0) * 1000)
                writer.close()
                took = svc.instances[0].phases.as_dict()
                got["restore"].append(took.get("restore", 0.0) * 1000)
                for name, seconds in took.items():
                    phases.setdefault(name, []).append(seconds * 1000)
                deadline = time.monotonic() + 300
                while svc.instances or svc._stopping:
                    if time.monotonic() > deadline:
                        raise TimeoutError("the instance was not reaped within 300 s")
                    await asyncio.sleep(0.05)
        finally:
            await act.shutdown()
        return got | {f"phase {name}": ms for name, ms in phases.items()}

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as r:
        return r.run(run())


def standby(runs: int) -> dict[str, float]:
    """bench/standby.py's medians for hello: the thawed first request and the thaw itself (ms)."""
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "standby.py"), "--runs", str(runs), "--apps", "hello"],
                          capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise SystemExit(f"bench/standby.py failed:\n{(done.stdout + done.stderr)[-2000:]}")
    first = re.search(r"first request, standby thawed\s+([\d.]+)", done.stdout)
    thaw = re.search(r"the thaw itself \(daemon log\): median ([\d.]+) ms", done.stdout)
    if first is None:
        raise SystemExit(f"bench/standby.py printed no standby row:\n{done.stdout[-2000:]}")
    return {"ttfb": float(first.group(1)), "thaw": float(thaw.group(1)) if thaw else float("nan")}


def inside(runs: int) -> dict[str, Any]:
    fs = subprocess.run(["stat", "-fc", "%T", "/sys/fs/cgroup"], capture_output=True, text=True).stdout.strip()
    out: dict[str, Any] = {"cgroupfs": fs, "runs": runs}
    for path in PATHS:
        # One process per path: the runc path is chosen by replacing a module function, which must not leak.
        done = subprocess.run([sys.executable, __file__, "--one-path", path, "--runs", str(runs)], capture_output=True,
                              text=True, timeout=3600)
        if done.returncode != 0:
            raise SystemExit(f"restore through {path} failed:\n{(done.stdout + done.stderr)[-2000:]}")
        out[path] = json.loads(done.stdout.strip().splitlines()[-1])
    out["standby"] = standby(runs)
    return out


def median(xs: list[float] | None) -> str:
    return f"{statistics.median(xs):8.0f}" if xs else f"{'n/a':>8}"


def table(results: dict[str, dict[str, Any]], emulated: bool) -> str:
    note = ", QEMU TCG (emulated: compare rows, not absolutes)" if emulated else ""
    lines = [f"Time to first byte and its parts, ms, median of {next(iter(results.values()))['runs']} runs{note}", "",
             f"{'host':28} {'restore direct':>15} {'call':>8} {'restore runc':>13} {'call':>8} "
             f"{'standby thaw':>13} {'thaw':>8}"]
    for label, r in results.items():
        d, rc, sb = r.get("direct") or {}, r.get("runc") or {}, r["standby"]
        lines.append(f"{label:28} {median(d.get('ttfb')):>15} {median(d.get('restore'))} "
                     f"{median(rc.get('ttfb')):>13} {median(rc.get('restore'))} {sb['ttfb']:13.0f} {sb['thaw']:8.1f}")
    lines += ["", "Each phase of the instance's start, ms, median (what the first byte waits for besides the call)"]
    for label, r in results.items():
        for path in PATHS:
            got = r.get(path) or {}
            parts = [f"{k.removeprefix('phase ')} {statistics.median(v):.1f}" for k, v in got.items()
                     if k.startswith("phase ") and v]
            if parts:
                lines.append(f"{label:28} {path:7} " + ", ".join(parts))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--inside", action="store_true", help="measure on this host; JSON to $VM_RESULTS or stdout")
    ap.add_argument("--one-path", choices=PATHS, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one_path:
        print(json.dumps(restores(args.one_path, args.runs)))
        return
    if args.inside:
        got = inside(args.runs)
        if os.environ.get("VM_RESULTS"):
            (Path(os.environ["VM_RESULTS"]) / "bench.json").write_text(json.dumps(got))
        print(table({f"here ({got['cgroupfs']})": got}, emulated=bool(os.environ.get("ACTIVATOR_VM"))))
        return
    results: dict[str, dict[str, Any]] = {}
    for cg, label in (("v1", "VM, cgroup v1 hybrid"), ("v2", "VM, pure cgroup v2")):
        with tempfile.TemporaryDirectory(prefix="cgroupvm-") as tmp:
            done = subprocess.run(["bash", str(ROOT / "scripts" / "vm" / "run"), "--cgroup", cg, "--timeout", "3600",
                                   "--results", tmp, "--", ".venv/bin/python", "bench/cgroupvm.py", "--inside",
                                   "--runs", str(args.runs)], timeout=4000)
            report = Path(tmp) / "results" / "bench.json"
            if done.returncode != 0 or not report.exists():
                raise SystemExit(f"the {cg} VM run failed (status {done.returncode}); see its output above")
            results[label] = json.loads(report.read_text())
    print()
    print(table(results, emulated=True))


if __name__ == "__main__":
    main()
