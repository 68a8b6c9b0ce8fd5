"""Checkpoints that move between hosts (issue 20): what moving one costs, and whether an imported checkpoint
restores as fast as one built here.

For each app: host A builds its checkpoint; `activator checkpoint export` (size, seconds); push to a local CNCF
distribution registry on loopback (Debian's docker-registry); host B (another state dir: another user namespace
range, so the import also moves the dump into B's range) runs `activator checkpoint pull` (pull + verify +
install, seconds). Then the first byte of an HTTP answer through a fresh daemon, N rounds each: on A (built
here) and on B (imported). Traffic goes to loopback only. Run as root after `make setup` and the demo images:

    .venv/bin/python bench/multihost.py [--apps tomcat,hello] [--runs 5]
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import yaml

ACTIVATOR = [sys.executable, "-m", "activator"]
APPS: dict[str, dict[str, Any]] = {
    "hello": {"image": "activator-demo/busybox:latest", "port": 8080,
              "command": ["httpd", "-f", "-p", "8080", "-h", "/www"], "share_memory": False},
    "tomcat": {"image": "activator-demo/tomcat:latest", "port": 8080, "share_memory": False,
               "environment": {"JAVA_OPTS": "-XX:+UseSerialGC -Xms32m -Xmx256m -Xss256k -XX:-UsePerfData "
                                            "-XX:TieredStopAtLevel=1", "MALLOC_ARENA_MAX": "2"},
               "readiness": {"http_path": "/", "timeout": "120s"}, "resources": {"memory": "512m"}},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def config(work: Path, host: str, app: str, port: int, registry: str) -> Path:
    """A signs what it exports and pushes (work/keys/builder); B verifies with the public key."""
    key = work / "keys" / "builder"
    if not key.exists():
        key.parent.mkdir(mode=0o700)
        subprocess.run([*ACTIVATOR, "checkpoint", "keygen", str(key), "-c", str(work / "none.yaml")], check=True,
                       capture_output=True, timeout=60)
    trust = {"sign_key": str(key)} if host == "a" else {"keys": [f"{key}.pub"]}
    path = work / f"{host}-{app}.yaml"
    path.write_text(yaml.safe_dump({
        "settings": {"state_dir": str(work / host), "metrics": None, "checkpoint_trust": trust,
                     "checkpoint_registry": {"repository": f"{registry}/bench", "tls_verify": False,
                                             "push": False, "pull": False}},
        "services": {app: APPS[app] | {"listen": f"127.0.0.1:{port}"}}}))
    return path


def cli(*argv: str) -> float:
    return cli_said(*argv)[0]


def cli_said(*argv: str) -> tuple[float, str]:
    t0 = time.monotonic()
    p = subprocess.run([*ACTIVATOR, *argv], capture_output=True, text=True, timeout=900)
    if p.returncode:
        raise SystemExit(f"activator {' '.join(argv)} failed: {p.stderr.strip()[-500:]}")
    return time.monotonic() - t0, p.stderr


def first_byte(cfg: Path, port: int) -> float:
    """A fresh daemon on the stored checkpoint; connect -> first byte of GET / (a restore), in ms."""
    proc = subprocess.Popen([*ACTIVATOR, "run", "-c", str(cfg)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                            text=True)
    try:
        assert proc.stdout is not None
        while " ready on " not in (line := proc.stdout.readline()):
            if not line:
                raise SystemExit(f"the daemon for {cfg.name} exited before it was ready")
        time.sleep(1.0)  # its prepared slot is made after start-up, as on a host at rest
        t0 = time.monotonic()
        with socket.create_connection(("127.0.0.1", port), timeout=30) as s:
            s.sendall(b"GET / HTTP/1.0\r\n\r\n")
            if not s.recv(1):
                raise SystemExit("no answer")
            took = time.monotonic() - t0
        return took * 1000
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--apps", default="tomcat,hello")
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (after make setup)")
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-multihost-", dir="/var/lib") as tmp:
        work = Path(tmp)
        os.chmod(work, 0o711)  # instances in a user namespace pass through to their files
        reg_port = free_port()
        (work / "registry.yml").write_text(yaml.safe_dump({
            "version": 0.1, "log": {"level": "error"}, "http": {"addr": f"127.0.0.1:{reg_port}"},
            "storage": {"filesystem": {"rootdirectory": str(work / "registry")}}}))
        registry = subprocess.Popen(["docker-registry", "serve", str(work / "registry.yml")],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            time.sleep(0.5)
            for app in args.apps.split(","):
                port = free_port()
                a = config(work, "a", app, port, f"127.0.0.1:{reg_port}")
                b = config(work, "b", app, port, f"127.0.0.1:{reg_port}")
                build = cli("checkpoint", app, "-c", str(a))
                archive = work / f"{app}.tar"
                export = cli("checkpoint", "export", app, "-o", str(archive), "-c", str(a))
                push = cli("checkpoint", "push", app, "-c", str(a))
                pull, said = cli_said("checkpoint", "pull", app, "-c", str(b))
                m = re.search(r"pulled in ([\d.]+)s and installed in ([\d.]+)s", said)
                unpack = re.search(r"image unpacked in ([\d.]+)s", said)
                pages = sum(p.stat().st_size for p in (work / "a" / "checkpoints" / app / "criu").glob("pages-*"))
                built, imported = [], []
                for _ in range(args.runs):  # interleaved: neither gets the quieter half of the run
                    built.append(first_byte(a, port))
                    imported.append(first_byte(b, port))
                rows.append((app, build, pages, archive.stat().st_size, export, push,
                             f"{pull:.2f} ({m.group(1) if m else '?'} + {m.group(2) if m else '?'}; image "
                             f"{unpack.group(1) if unpack else '?'})",
                             statistics.median(built), min(built), max(built),
                             statistics.median(imported), min(imported), max(imported)))
                for host in ("a", "b"):
                    subprocess.run([*ACTIVATOR, "cleanup", "-c", str(work / f"{host}-{app}.yaml")],
                                   capture_output=True, timeout=120)
        finally:
            registry.terminate()
            registry.wait(timeout=10)
            shutil.rmtree(work / "registry", ignore_errors=True)
    print(f"checkpoints between hosts ({args.runs} first-byte runs each; seconds are whole CLI commands, Python "
          "start-up included)")
    print(f"{'app':<8} {'build s':>8} {'pages':>9} {'archive':>9} {'export s':>9} {'push s':>7} "
          f"{'pull s (skopeo + install; image unpack)':>32} "
          f"{'1st byte built ms':>22} {'1st byte imported ms':>22}")
    for r in rows:
        print(f"{r[0]:<8} {r[1]:>8.2f} {r[2] / 2**20:>7.1f}Mi {r[3] / 2**20:>7.1f}Mi {r[4]:>9.2f} {r[5]:>7.2f} "
              f"{r[6]:>32} {r[7]:>8.1f} ({r[8]:.1f}-{r[9]:.1f}) {r[10]:>10.1f} ({r[11]:.1f}-{r[12]:.1f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
