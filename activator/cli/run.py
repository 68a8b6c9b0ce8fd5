"""`activator run`: the daemon in the foreground (the one command that imports the lifecycle)."""

from __future__ import annotations

import argparse

from activator.config.document import Config
from activator.config.service import ServiceConfig

from .loop import run_async


def cmd_run(cfg: Config, args: argparse.Namespace) -> int:
    from activator.daemon.server import Activator

    def announce(act: Activator) -> None:
        if cfg.settings.metrics:
            print(f"activator: metrics on http://{cfg.settings.metrics}/metrics", flush=True)

    def service(svc: ServiceConfig, problem: str | None) -> None:
        # svc has the addresses of `listen: systemd` sockets filled in
        for addr in svc.listen:
            print(f"activator: {svc.name} ready on {addr}" if problem is None else
                  f"activator: {svc.name} NOT serving on {addr}: no checkpoint ({problem})", flush=True)

    async def main() -> int:
        act = Activator(cfg, on_ready=announce, on_service=service)
        await act.serve()
        return 1 if act.teardown_failures else 0  # each failed cleanup step was logged

    return run_async(main)
