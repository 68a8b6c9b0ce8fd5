"""Command line: `activator run|validate|checkpoint|cleanup`.

Errors a user can cause come out as one line, `activator: error: ...`, and a non-zero exit; never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from . import __version__, preflight
from .config import Config, load_config
from .errors import ActivatorError, ConfigError

log = logging.getLogger("activator")


def _setup_logging(level: str) -> None:
    # One line per event; journald adds its own timestamps, a terminal wants them.
    fmt = "%(levelname)s %(name)s: %(message)s" if not sys.stderr.isatty() else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, stream=sys.stderr)


def _run(coro_factory: Callable[[], Coroutine[Any, Any, int]]) -> int:
    import uvloop

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro_factory())


def cmd_validate(cfg: Config, args: argparse.Namespace) -> int:
    names = ", ".join(s.name for s in cfg.services)
    print(f"{cfg.path}: ok ({len(cfg.services)} service(s): {names})")
    return 0


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from .server import Activator

    def announce(act: Activator) -> None:
        for svc in cfg.services:
            for addr in svc.listen:
                print(f"activator: {svc.name} ready on {addr}", flush=True)
        if cfg.settings.metrics:
            print(f"activator: metrics on http://{cfg.settings.metrics}/metrics", flush=True)

    async def main() -> int:
        await Activator(cfg, on_ready=announce).serve()
        return 0

    return _run(main)


def cmd_checkpoint(cfg: Config, args: argparse.Namespace) -> int:
    from .server import StateDir, open_host

    svc = cfg.service(args.service)

    async def main() -> int:
        state = StateDir(cfg.settings.state_dir)
        try:
            _runc, builder = open_host(state)
            ck, built = await builder.ensure(svc, rebuild=args.rebuild)
        finally:
            state.unlock()
        verb = f"built in {ck.build_seconds:.1f}s" if built else "is current"
        print(f"{svc.name}: checkpoint {verb}: {ck.dir} (listens on {', '.join(map(str, ck.listening_ports))}; "
              f"{ck.pages_bytes / 2**20:.1f} MiB of pages)")
        return 0

    return _run(main)


def cmd_cleanup(cfg: Config, args: argparse.Namespace) -> int:
    from .server import StateDir, clean_leftovers

    async def main() -> int:
        preflight.check_root()
        state = StateDir(cfg.settings.state_dir)
        state.lock()
        try:
            runc, _ = state.tools()
            cleaned = await clean_leftovers(state, runc)
        finally:
            state.unlock()
        print("\n".join(cleaned) if cleaned else "nothing to clean")
        return 0

    return _run(main)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="activator", description=__doc__)
    p.add_argument("--version", action="version", version=f"activator {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sub = p.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[Config, argparse.Namespace], int], help: str) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help)
        sp.add_argument("-c", "--config", default="/etc/activator/services.yaml", help="services YAML file")
        sp.set_defaults(fn=fn)
        return sp

    add("run", cmd_run, "listen on every service's addresses and restore instances on demand")
    v = add("validate", cmd_validate, "check a services file without starting anything")
    v.add_argument("file", nargs="?", help="services YAML file (same as -c)")
    ck = add("checkpoint", cmd_checkpoint, "build a service's checkpoint if missing or stale")
    ck.add_argument("service")
    ck.add_argument("--rebuild", action="store_true", help="rebuild even if current")
    add("cleanup", cmd_cleanup, "remove instances, mounts and namespaces left by a crashed run")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        cfg = load_config(getattr(args, "file", None) or args.config)
        return int(args.fn(cfg, args))
    except ConfigError as e:
        print(f"activator: error: {e}", file=sys.stderr)
        return 2
    except ActivatorError as e:
        print(f"activator: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
