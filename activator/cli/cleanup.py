"""`activator cleanup`: what a crashed run left behind, removed without starting anything."""

from __future__ import annotations

import argparse
import asyncio

from activator.config.document import Config
from activator.runtime import preflight

from .loop import run_async


def cmd_cleanup(cfg: Config, args: argparse.Namespace) -> int:
    from activator.checkpoints.host import clean_leftovers, host_network, runc_for
    from activator.checkpoints.images import ImageSource
    from activator.statedir import StateDir

    async def main() -> int:
        preflight.check_root()
        state = StateDir.of(cfg)
        state.lock()
        try:
            network = host_network(cfg)
            images = ImageSource(state.root, cfg.settings.images)
            cleaned = await clean_leftovers(state, runc_for(state), images, network)
            if network is not None:
                await asyncio.to_thread(network.close)  # the bridge and firewall rules go too: nothing runs
        finally:
            state.unlock()
        print("\n".join(cleaned) if cleaned else "nothing to clean")
        return 0

    return run_async(main)
