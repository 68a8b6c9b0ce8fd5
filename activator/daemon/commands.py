"""What the control socket may ask of the running daemon (root only): status, plan and reload, rebuild, and the
runtime controls `activator wake|scale|stop|start SERVICE`, each logged and counted
(activator_control_actions_total)."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

from activator.errors import ActivatorError

from .builds import Builds
from .fleet import Fleet
from .reloading import Reloader
from .service import Service

log = logging.getLogger("activator")

#: how long `activator wake|scale` waits for the instances it starts
CONTROL_START_TIMEOUT = 300.0


class Commands:
    def __init__(self, fleet: Fleet, builds: Builds, reloader: Reloader) -> None:
        self.fleet = fleet
        self.builds = builds
        self.reloader = reloader

    def handlers(self) -> dict[str, Callable[..., Any | Awaitable[Any]]]:
        """The control socket's verbs."""
        return {"status": self.fleet.status, "rebuild": self.builds.rebuild, "reload": self.reloader.reload,
                "plan": self.reloader.plan, "wake": self.wake, "scale": self.scale, "stop": self.stop,
                "start": self.start, "import": self.builds.import_archive, "pull": self.builds.pull,
                "push": self.builds.push, "export": self.builds.export}

    def _controlled(self, svc: Service, action: str, what: str) -> None:
        self.fleet.metrics.control_actions.labels(svc.name, action).inc()
        log.info("service=%s %s (activator %s)", svc.name, what, action)

    async def wake(self, name: str = "") -> dict[str, Any]:
        """Restore one instance now, without a client (if none runs)."""
        svc = self.fleet.service(name)
        had = len(svc.instances)
        up = had or await svc.scale_to(1, timeout=CONTROL_START_TIMEOUT)
        self._controlled(svc, "wake", "woken" if not had else f"already awake ({had} instance(s))")
        return {"service": name, "instances": up, "woken": not had}

    async def scale(self, name: str = "", n: str = "") -> dict[str, Any]:
        """Restore instances now until n are up (at most max_instances)."""
        svc = self.fleet.service(name)
        if not n.isdigit() or not 1 <= int(n) <= 10_000:
            raise ActivatorError(f"scale {name}: give a number of instances from 1 to {svc.config.max_instances}")
        up = await svc.scale_to(int(n), timeout=CONTROL_START_TIMEOUT)
        self._controlled(svc, "scale", f"scaled to {up} instance(s) (asked {n}, max_instances "
                                       f"{svc.config.max_instances})")
        return {"service": name, "instances": up, "max_instances": svc.config.max_instances}

    async def stop(self, name: str = "") -> dict[str, Any]:
        """Stop serving (connections refused, reason `stopped`), drain, stop every instance; until `start`."""
        svc = self.fleet.service(name)
        await svc.stop_serving(self.fleet.config.settings.drain_timeout)
        self._controlled(svc, "stop", "stopped: connections refused until `activator start`")
        return {"service": name, "stopped": True}

    async def start(self, name: str = "") -> dict[str, Any]:
        svc = self.fleet.service(name)
        svc.start_serving()
        self._controlled(svc, "start", "serving again")
        return {"service": name, "stopped": False}
