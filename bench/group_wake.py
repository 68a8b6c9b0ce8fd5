"""Group activation: the first request of an app that needs its database, with and without depends_on.

  depends_on   the database is woken together with the app (restores side by side)
  on demand    the same two services without depends_on: the database is woken by the app's own connection to it
               (the app's request waits for the app's restore, then for the database's)

The app is busybox httpd with a CGI that asks the "database" (the echo server) over TCP by name and answers with
its reply; each round starts with nothing running (a fresh daemon on the same checkpoints) and times connect to
the full answer. Traffic goes to loopback and the bridge this daemon made. Run as root after `make setup`:

    .venv/bin/python bench/group_wake.py [--runs N]
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

BUSYBOX = "activator-demo/busybox:latest"
GATEWAY = "10.89.0.1"
STATE = Path("/var/lib/activator/bench-group")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(work: Path, grouped: bool, web_port: int, db_port: int) -> Path:
    cgi = work / "cgi"
    cgi.mkdir(exist_ok=True)
    (cgi / "db").write_text("#!/bin/sh\necho 'Content-Type: text/plain'\necho\n"
                            f"echo asked | nc -w 5 db {db_port}\n")
    (cgi / "db").chmod(0o755)
    web: dict[str, Any] = {"image": BUSYBOX, "command": ["httpd", "-f", "-p", "8080", "-h", "/www"], "port": 8080,
                           "listen": f"127.0.0.1:{web_port}", "volumes": [f"{cgi}:/www/cgi-bin:ro"]}
    if grouped:
        web["depends_on"] = ["db"]
    else:
        web["extra_hosts"] = {"db": GATEWAY}
    db = {"image": BUSYBOX, "command": ["echo-server", "9000"], "port": 9000, "listen": f"{GATEWAY}:{db_port}"}
    path = work / f"{'grouped' if grouped else 'demand'}.yaml"
    path.write_text(yaml.safe_dump({"settings": {"state_dir": str(STATE), "metrics": None},
                                    "services": {"web": web, "db": db}}))
    return path


async def one_round(path: Path, web_port: int) -> float:
    from activator.config.model import load_config
    from activator.daemon.server import Activator

    act = Activator(load_config(path))
    await act.startup()
    try:
        await asyncio.sleep(1.0)  # a daemon at rest: its prepared slots made, nothing running
        t0 = time.perf_counter()
        reader, writer = await asyncio.open_connection("127.0.0.1", web_port)
        writer.write(b"GET /cgi-bin/db HTTP/1.0\r\n\r\n")
        reply = await asyncio.wait_for(reader.read(), 30)
        took = time.perf_counter() - t0
        writer.close()
        if b"asked" not in reply:
            raise SystemExit(f"no answer from the database: {reply[-200:]!r}")
        return took * 1000
    finally:
        await act.shutdown()


async def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    if os.geteuid() != 0:
        raise SystemExit("run as root (after make setup)")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for grouped in (True, False):
            web_port, db_port = free_port(), free_port()
            path = config(work, grouped, web_port, db_port)
            await one_round(path, web_port)  # builds the checkpoints; not timed
            times = [await one_round(path, web_port) for _ in range(args.runs)]
            rows.append(("depends_on" if grouped else "on demand", times))
    print(f"{'first request needing the db':<30} {'median':>8} {'min':>8} {'max':>8}   (ms, {args.runs} runs)")
    for name, times in rows:
        print(f"{name:<30} {statistics.median(times):>8.1f} {min(times):>8.1f} {max(times):>8.1f}")


if __name__ == "__main__":
    asyncio.run(main())
