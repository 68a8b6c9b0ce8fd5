"""Every bench script once, with tiny counts: they keep working as the code under them changes (`make test` runs
this after the suite). Nothing is timed or compared here: benchmarks are not tests. A script that fails prints its
last lines and makes this exit 1.

Needs what the benches need: root, `make setup`, and the demo images (scripts/build-images.sh busybox tomcat
redis postgres dns); warmpath also needs redis-benchmark, iperf3 and systemd-socket-proxyd on the host
(scripts/setup.sh).
    .venv/bin/python bench/smoke.py
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent


def runs(out: Path) -> list[list[str]]:
    return [
        ["coldstart.py", "--runs", "1", "--apps", "hello", "--chart", str(out / "coldstart.png")],
        ["coldstart.py", "--breakdown", "--runs", "1", "--apps", "hello", "--restore-memory", "copy,map", "--first",
         "3"],
        # its measurements alone, on this host: booting the VM twice is not a smoke run
        ["cgroupvm.py", "--inside", "--runs", "1"],
        ["group_wake.py", "--runs", "1"],
        ["multihost.py", "--apps", "hello", "--runs", "1"],
        ["network_cost.py", "--runs", "1"],
        ["pgbench.py", "--seconds", "1", "--clients", "2", "--runs", "1"],
        ["scaleout.py", "--instances", "2", "--services", "2", "--rounds", "1", "--restore-memory", "map",
         "--out", str(out / "scaleout.json")],
        ["scrape_flood.py", "--flood", "200", "--scrapes", "5"],
        ["standby.py", "--runs", "1", "--apps", "hello"],
        ["udp.py", "--flows", "4", "--queries", "200", "--runs", "1"],
        ["warmpath.py", "--requests", "2000", "--seconds", "1", "--runs", "1", "--out", str(out)],
        ["warmpath_http.py", "--seconds", "1", "--warmup", "1", "--runs", "1"],
        ["warmup.py", "--runs", "1", "--count", "20", "--requests", "5"],
    ]


def main() -> int:
    scripts = {p.name for p in BENCH.glob("*.py")} - {"smoke.py"}
    failed = []
    with tempfile.TemporaryDirectory(prefix="bench-smoke-") as tmp:
        plan = runs(Path(tmp))
        missing = scripts - {r[0] for r in plan}
        if missing:  # a new bench script gets a smoke run here, or this fails
            print(f"bench/smoke.py: no smoke run for {', '.join(sorted(missing))}", file=sys.stderr)
            return 1
        for args in plan:
            t0 = time.monotonic()
            done = subprocess.run([sys.executable, str(BENCH / args[0]), *args[1:]], capture_output=True, text=True,
                                  timeout=900)
            took = time.monotonic() - t0
            ok = done.returncode == 0 and done.stdout.strip()
            print(f"{'ok ' if ok else 'FAILED'} {' '.join(args)}  ({took:.0f}s)", flush=True)
            if not ok:
                failed.append(args[0])
                print("\n".join((done.stdout + done.stderr).strip().splitlines()[-25:]), file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
