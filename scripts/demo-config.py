"""The bundled demo (config/demo.yaml) with other ports or another state dir, for `make demo DEMO_PORT=...`:
printed to stdout, so the checked-in file stays the one the README describes.

    python scripts/demo-config.py --port 18080 --state-dir /var/lib/activator/demo2 --metrics 127.0.0.1:19464

tomcat listens on 127.0.0.1:PORT and hello on 127.0.0.1:PORT+1; an empty option keeps the file's value."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

DEMO = Path(__file__).resolve().parent.parent / "config" / "demo.yaml"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--port", default="", help="tomcat's port; hello gets the next one")
    ap.add_argument("--state-dir", default="")
    ap.add_argument("--metrics", default="", help="HOST:PORT, or 'null' for none")
    args = ap.parse_args()
    doc = yaml.safe_load(DEMO.read_text())
    if args.port:
        port = int(args.port)
        if not 1 <= port < 65535:
            raise SystemExit(f"demo-config: DEMO_PORT={args.port} is not a port below 65535")
        doc["services"]["tomcat"]["listen"] = f"127.0.0.1:{port}"
        doc["services"]["hello"]["listen"] = f"127.0.0.1:{port + 1}"
    if args.state_dir:
        doc["settings"]["state_dir"] = args.state_dir
    if args.metrics:
        doc["settings"]["metrics"] = None if args.metrics == "null" else args.metrics
    sys.stdout.write(f"# config/demo.yaml with make demo's overrides ({' '.join(sys.argv[1:])})\n")
    sys.stdout.write(yaml.safe_dump(doc, sort_keys=False))
    return 0


if __name__ == "__main__":
    sys.exit(main())
