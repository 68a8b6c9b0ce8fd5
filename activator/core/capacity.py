"""Capacity decisions, with no I/O: which instance takes a connection, how many more to restore, when to retry.

The service owns the instances and calls these; they are kept pure so the rules can be tested in isolation
and read in one place.

- A connection goes to the least-loaded ready instance if that one is below `target_connections`.
- Otherwise more instances are started while the demand (connections on ready instances, plus connections
  waiting, plus the new one) exceeds what ready and starting instances can hold at target, up to
  `max_instances`. A burst of N connections therefore starts ceil(N / target) instances at once, in parallel.
- When nothing more can be started (at max_instances, or backing off), the least-loaded instance takes the
  connection even above target: target is a scaling threshold, max_connections is the hard limit.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from activator.config.sections import Backoff


class Loaded(Protocol):
    @property
    def connections(self) -> int: ...


L = TypeVar("L", bound=Loaded)


def least_loaded(instances: Iterable[L]) -> L | None:
    return min(instances, key=lambda i: i.connections, default=None)


def starts_needed(*, demand: int, ready: int, starting: int, target: int, max_instances: int) -> int:
    """How many more instances to start now so that `demand` connections fit at `target` each."""
    wanted = math.ceil(demand / target) if demand > 0 else 0
    return max(0, min(wanted, max_instances) - ready - starting)


@dataclass
class FailureBackoff:
    """Consecutive failures push the next attempt out: initial, doubling, capped at max; a success resets it."""

    policy: Backoff
    failures: int = 0
    until: float = 0.0

    def failed(self, now: float) -> float:
        self.failures += 1
        delay = self.policy.delay(self.failures)
        self.until = now + delay
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.until = 0.0

    def active(self, now: float) -> bool:
        return now < self.until

    def remaining(self, now: float) -> float:
        return max(0.0, self.until - now)


@dataclass
class Budget:
    """The daemon's own connection budget, shared by every service: what its file-descriptor limit allows.

    A spliced connection costs two descriptors (client and backend). Running out is the activator's problem, not
    an app's: past the budget a connection is turned away (reason `resources`) instead of failing somewhere
    deeper, where it could be mistaken for an instance that refuses connections.
    """

    limit: int
    used: int = 0

    def take(self) -> bool:
        if self.used >= self.limit:
            return False
        self.used += 1
        return True

    def give(self) -> None:
        self.used -= 1


def connection_budget(nofile: int, open_fds: int, services: int) -> int:
    """Connections the descriptor limit leaves room for, after what the daemon itself needs: its open files,
    and per service some for restores in flight (runc's pipes, logs, namespaces)."""
    reserve = open_fds + 64 + 16 * services
    return max(0, (nofile - reserve) // 2)
