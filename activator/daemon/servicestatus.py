"""A service's status as `activator status` and the control socket show it (one JSON object)."""

from __future__ import annotations

import time
from typing import Any

from .servicestate import ServiceState


def status(self: ServiceState) -> dict[str, Any]:
    now, wall = self.clock.now(), time.time()
    ck = self.checkpoint
    return {
        "name": self.name,
        "listen": [str(a) for a in self.config.listen],
        "open_connections": self.open_connections + self.kernel_connections,
        "mode": self.mode.name,  # how new connections reach its instances (steering.py)
        "kernel_path": self.mode.steers,
        "handoff": self.mode.name == "handoff",
        "max_connections": self.config.max_connections or self.budget.limit,
        "waiting": self.waiting,
        "starting": len(self._starts),
        "started_total": self.started_total,  # instances brought up (restored or cold-started) since start
        "backoff_seconds": round(self.start_backoff.remaining(now), 3),
        "restore_backoff_seconds": round(self.restore_backoff.remaining(now), 3),
        "min_instances": self.config.min_instances,
        "kept_warm": self.kept_warm,  # by keep_alive_schedule, now
        "max_instances": self.config.max_instances,
        "stopped": self.stopped,
        "depends_on": [d.name for d in self.dependencies],
        "kept_for": self.held(),
        "checkpoint_problem": self.checkpoint_problem,
        "checkpoint_retry_seconds": round(max(0.0, self.checkpoint_retry_at - now), 1)
        if self.checkpoint_problem else 0.0,
        "checkpoint": None if ck is None else {
            "dir": str(ck.dir), "age_seconds": round(wall - ck.created, 1), "pages_bytes": ck.pages_bytes,
            "image_id": ck.origin.image_id,
        },
        "standby": self.launcher.standby,
        "standbys": [
            {"name": i.name, "age_seconds": round(now - i.ready_at, 1), "memory_bytes": i.sandbox.memory_bytes(),
             "address": str(i.sandbox.attachment.ip) if i.sandbox.attachment else None}
            for i in self.launcher.standbys
        ],
        "instances": [
            {"name": i.name, "how": i.how, "age_seconds": round(now - i.ready_at, 1),
             "connections": i.connections, "kernel_connections": i.track.kernel,
             "served": i.track.served + i.track.kernel_served, "served_by_kernel": i.track.kernel_served,
             "address": str(i.sandbox.attachment.ip) if i.sandbox.attachment else None,
             "start_ms": round(i.start_seconds * 1000, 1),
             "memory_bytes": i.sandbox.memory_bytes(), "cpu_seconds": i.sandbox.cpu_seconds()}
            for i in self.instances
        ],
    }
