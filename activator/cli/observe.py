"""The running daemon and its apps observed: `activator status`, `top` (status --watch) and `logs`."""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from activator.config.document import Config
from activator.core import liveview
from activator.core.liveview import age, size
from activator.errors import ActivatorError

from .control import control_socket
from .render import TerminalSafe


def cmd_status(cfg: Config | None, args: argparse.Namespace) -> int:
    from activator.daemon import control

    where = control_socket(cfg, args.config)
    if args.watch:
        return _watch(where, cfg.path if cfg else args.config, args.interval, args.count)
    try:
        st = control.request(where, "status")
    except ActivatorError as e:
        if args.json:  # a script reading stdout gets an answer too, not nothing
            print(json.dumps({"running": False, "socket": str(where), "error": str(e)}, indent=2))
        raise
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    print(f"activator pid {st['pid']}, up {age(st['uptime_seconds'])}, {cfg.path if cfg else args.config}"
          f"{'' if st['ready'] else ' (starting: checkpoints not all ready)'}")
    if st.get("retiring"):
        print(f"old definitions finishing their connections after a reload: {', '.join(st['retiring'])}")
    for svc in st["services"]:
        ck = svc["checkpoint"]
        ck_text = f"checkpoint {age(ck['age_seconds'])} old, {size(ck['pages_bytes'])} of pages" if ck else \
            "no checkpoint yet"
        extra = []
        if svc["waiting"]:
            extra.append(f"{svc['waiting']} waiting")
        if svc["starting"]:
            extra.append(f"{svc['starting']} starting")
        if svc["backoff_seconds"]:
            extra.append(f"backing off {svc['backoff_seconds']:.1f}s")
        if svc["restore_backoff_seconds"]:
            extra.append(f"restores backing off {svc['restore_backoff_seconds']:.1f}s")
        if svc.get("handoff"):
            extra.append("handoff (its apps accept from its socket)")
        if svc.get("depends_on"):
            extra.append(f"depends on {', '.join(svc['depends_on'])}")
        if svc.get("kept_for"):
            extra.append(f"kept for {', '.join(svc['kept_for'])}")
        if svc.get("stopped"):
            extra.append(f"STOPPED (activator stop): connections refused until `activator start {svc['name']}`")
        if svc.get("checkpoint_problem"):
            extra.append(f"NO CHECKPOINT, connections refused, next build in {svc['checkpoint_retry_seconds']:.0f}s: "
                         f"{svc['checkpoint_problem']}")
        print(f"\n{svc['name']}  on {' '.join(svc['listen'])}  {len(svc['instances'])}/{svc['max_instances']} "
              f"instance(s), {svc['open_connections']} open connection(s); {ck_text}"
              + (f"; {', '.join(extra)}" if extra else ""))
        if svc["instances"]:
            print(f"  {'INSTANCE':<22} {'HOW':<10} {'AGE':>6} {'CONNS':>6} {'SERVED':>7} {'START':>9}")
        for i in svc["instances"]:
            ms = i["start_ms"]
            print(f"  {i['name']:<22} {i['how']:<10} {age(i['age_seconds']):>6} {i['connections']:>6} "
                  f"{i['served']:>7} {ms:>7.{1 if ms < 10 else 0}f}ms")
        if svc.get("standby"):
            standbys = svc.get("standbys", [])
            memory = sum(s["memory_bytes"] or 0 for s in standbys)
            print(f"  standby: {len(standbys)}/{svc['standby']} frozen, {size(memory)} charged"
                  + (f" ({', '.join(s['name'] for s in standbys)})" if standbys else ""))
    return 0


def refresh_interval(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number of seconds") from None
    if not 0.1 <= value <= 3600:
        raise argparse.ArgumentTypeError(f"{text}: refresh between 0.1 and 3600 seconds")
    return value


def refresh_count(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"'{text}': a number of refreshes, at least 1")
    return int(text)


def _watch(where: Any, path: object, interval: float, count: int | None) -> int:
    """The live view: a frame every `interval` seconds, drawn over the last one on a terminal (printed one after
    another otherwise), until Ctrl-C or `count` frames."""
    from activator.daemon import control

    tty = sys.stdout.isatty()
    prev: dict[str, Any] | None = None
    t_prev = 0.0
    shown = 0
    try:
        while count is None or shown < count:
            st = control.request(where, "status")
            now = time.monotonic()
            header = (f"activator pid {st['pid']}, up {age(st['uptime_seconds'])}, {path}  "
                      f"{time.strftime('%H:%M:%S')}  (every {interval:g}s{', Ctrl-C to quit' if tty else ''})")
            lines = liveview.frame(st, prev, now - t_prev, header)
            sys.stdout.write(("\x1b[H\x1b[J" if tty else "") + "\n".join(lines) + "\n" + ("" if tty else "\n"))
            sys.stdout.flush()
            prev, t_prev, shown = st, now, shown + 1
            if count is None or shown < count:
                time.sleep(interval)
    except KeyboardInterrupt:
        pass
    return 0


def cmd_logs(cfg: Config, args: argparse.Namespace) -> int:
    """An app's output: what its reaped instances wrote (kept, applog.py), then its live instances' own files;
    with -f, what they write from then on (new instances included) until interrupted."""
    from activator.runtime import applog
    from activator.statedir import StateDir

    svc = cfg.service(args.service)  # a one-line error naming the known services
    state = StateDir.of(cfg)
    # Escaped wherever it goes (a pipe often ends on a terminal: `| tail`); --raw for the bytes as written.
    out = sys.stdout.buffer if args.raw else TerminalSafe(sys.stdout.buffer)

    def live() -> list[Path]:
        if not state.instances.is_dir():
            return []
        return sorted((d / "output.log" for d in state.instances.iterdir()
                       if applog.owner(d) == svc.name and not (d / "slot").exists()
                       and (d / "output.log").is_file()), key=lambda p: p.stat().st_mtime)

    for path in applog.kept(state.logs, svc.name):
        with open(path, "rb") as f:
            shutil.copyfileobj(f, out)
        out.flush()
    offsets: dict[Path, int] = {}
    while True:
        for path in live():
            try:
                with open(path, "rb") as f:
                    f.seek(offsets.get(path, 0))
                    data = f.read(1 << 20)
            except OSError:  # reaped meanwhile: its output is in the kept file now
                continue
            if data:
                if path not in offsets:
                    out.flush()
                    out.write(f"--- {path.parent.name} (running) ---\n".encode())
                out.write(data)
                out.flush()
            offsets[path] = offsets.get(path, 0) + len(data)
        if not args.follow:
            out.flush()
            return 0
        time.sleep(0.5)
