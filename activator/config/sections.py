"""A service's sections: readiness, warmup, pre_stop, resources and backoff, each a mapping of its own keys.

Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass

from .declare import key
from .kinds import DAY, HOUR, MINUTE, Args, Duration, Int, MiB, Number, Size, Text, human_duration


@dataclass(frozen=True)
class Readiness:
    """When a freshly started template counts as ready to be checkpointed."""

    timeout: float = key(Duration(0.1, HOUR), 60.0, doc="how long the template may take to listen on its port")
    http_path: str | None = key(
        Text(pattern=r"/[\x21-\x7e]*", hint="an absolute URL path like /health"), None, nullable=True, shapes=True,
        doc="also wait for GET on this path to answer 2xx/3xx before the dump (null: listening is enough)")
    command: tuple[str, ...] | None = key(
        Args(), None, nullable=True, shapes=True,
        doc="also run this in the template (as its app's user, in its sandbox) until it exits 0, like a Compose "
            "healthcheck's CMD; a string runs as `/bin/sh -c STRING` (CMD-SHELL)")
    command_timeout: float = key(Duration(0.1, HOUR), 30.0, doc="longest one run of command may take")


@dataclass(frozen=True)
class Warmup:
    """Requests sent to the template before it is dumped, so instances start with the app's caches filled and
    its hot code compiled (a JVM's JIT): what the first requests after a restore would otherwise pay for."""

    http_paths: tuple[str, ...] = key(Args(), (), shapes=True,
                                      doc="GET each of these paths (HTTP/1.1, Connection: close)")
    payload: str | None = key(Text(), None, nullable=True, shapes=True,
                              doc="or send this (raw TCP) on a connection and read the first reply")
    count: int = key(Int(1, 100_000), 100, shapes=True, doc="how many times, per path")

    def __post_init__(self) -> None:
        for p in self.http_paths:
            if not p.startswith("/"):
                raise ValueError(f"warmup.http_paths: '{p}' must start with '/'")


HTTP_METHODS = ("GET", "POST", "PUT", "DELETE")


@dataclass(frozen=True)
class PreStop:
    """An HTTP request the activator makes to an instance's app before it asks it to stop (idle reaping,
    scale-in, `activator stop`, a reload or the daemon's shutdown), so the app can flush, deregister or finish
    work: what Kubernetes' preStop httpGet and Docker's lifecycle hooks are for. The stop signal follows when it
    answers, fails, or times out."""

    http_path: str | None = key(
        Text(pattern=r"/[\x21-\x7e]*", hint="an absolute URL path like /admin/flush"), None, nullable=True,
        doc="the request's path, sent to the app's port on the instance's own loopback (null: no request)")
    method: str = key(Text(choices=HTTP_METHODS), "POST", doc="the request's method")
    timeout: float = key(Duration(0.1, 10 * MINUTE), 10.0,
                         doc="longest the request may take; the stop goes on after it either way")


#: a CFS quota of 1 ms per 100 ms period (spec.CPU_PERIOD_US), the least the kernel accepts
MIN_CPUS = 0.01


@dataclass(frozen=True)
class Resources:
    memory: int | None = key(Size(4 * MiB, 2**40), None, nullable=True, doc="memory limit per instance")
    cpus: float | None = key(Number(0, 1024), None, nullable=True, doc="CPU limit per instance")
    pids: int | None = key(Int(8, 4_194_304), None, nullable=True,
                           doc="process/thread limit per instance (at least 8: runc and the app need a few)")

    def __post_init__(self) -> None:
        # The kernel's smallest CFS quota is 1 ms (of a 100 ms period): less is EINVAL at every restore.
        if self.cpus is not None and self.cpus < MIN_CPUS:
            raise ValueError(f"cpus: {self.cpus:g} is below the kernel's smallest CPU quota; use at least {MIN_CPUS}")


@dataclass(frozen=True)
class Backoff:
    """How long a service waits after failed starts before trying again: initial, doubling up to max."""

    initial: float = key(Duration(0.01, DAY), 1.0, doc="wait after the first failure")
    max: float = key(Duration(0.01, DAY), 60.0, doc="longest wait, however many failures in a row")

    def __post_init__(self) -> None:
        if self.max < self.initial:
            raise ValueError(f"backoff.max ({human_duration(self.max)}) must be at least backoff.initial "
                             f"({human_duration(self.initial)})")

    def delay(self, failures: int) -> float:
        """The wait after `failures` consecutive failures (1 = the first)."""
        return float(min(self.max, self.initial * 2 ** min(64, max(0, failures - 1))))
