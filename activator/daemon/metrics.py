"""Prometheus metrics. One Metrics object per activator, with its own registry (tests run several at once)."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, fields, replace
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
)

from activator.config.addresses import ListenAddress

from .scrape import ScrapeServer

# Restores sit between ~50 ms (tiny apps) and a few seconds (fallback cold starts of JVMs).
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.15, 0.2, 0.3, 0.5, 0.75, 1.0, 2.0, 5.0, 10.0, 30.0)
BUILD_BUCKETS = (0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300)
#: why admission control closed a connection (the `reason` label; see service.py and proxy.py)
REJECT_REASONS = ("max-connections", "queue-full", "backoff", "no-checkpoint", "shutting-down", "resources",
                  "stopped")


@dataclass(frozen=True)
class ServiceMetrics:
    """One service's label children, bound once: the connection path does no label lookups."""

    restores: Any
    restore_failures: Any
    cold_starts: Any
    restore_duration: Any
    first_connection_wait: Any
    instances: Any
    open_connections: Any
    connections: Any
    connection_errors: Any
    bytes_in: Any
    bytes_out: Any
    idle_reaps: Any
    checkpoint_builds: Any
    checkpoint_build_duration: Any
    waiting: Any
    starting: Any
    backoff: Any
    restore_backoff: Any
    start_failures: Any
    instance_failures: Any
    ignored: Any
    idle_closes: Any
    checkpoint_build_failures: Any
    checkpoint_pages_bytes: Any
    checkpoint_created: Any
    checkpoint_outdated: Any
    standby_thaws: Any
    standby_instances: Any
    standby_memory: Any
    idle_cpu_busy: Any
    waiting_pages: Any
    udp_dropped: Any
    udp_replies_dropped: Any
    udp_unanswered: Any
    kept_warm: Any
    rejected: dict[str, Any]
    pre_stop: dict[str, Any]
    probes: dict[str, Any]  # "KIND/ANSWER" -> child of activator_probes_total


#: ServiceMetrics fields that are not a family of the same name labelled by service alone
SPECIAL = ("bytes_in", "bytes_out", "rejected", "pre_stop", "probes")
#: activator_probes_total's (kind, answer) label pairs
PROBE_LABELS = (("http", "recorded"), ("http", "live"), ("http", "unavailable"), ("tcp", "accepted"))
#: how a pre_stop request ended (activator_pre_stop_total's result label)
PRE_STOP_RESULTS = ("ok", "failed", "timeout")
#: the gauges a Service sets with its own state (the counters are totals per service name and stay shared)
STATE_GAUGES = ("instances", "open_connections", "waiting", "starting", "backoff", "restore_backoff",
                "standby_instances", "standby_memory", "kept_warm")


def detached(m: ServiceMetrics) -> ServiceMetrics:
    """The same counters, but gauges nobody scrapes: for the old definition of a changed service while it
    drains, so its state does not overwrite the new one's (they share the service's label)."""
    gauges: dict[str, Any] = {g: Gauge(f"retired_{g}", "", registry=None) for g in STATE_GAUGES}
    return replace(m, **gauges)


class CachedProcessCollector(ProcessCollector):
    """The process_* metrics, read at most every PROCESS_TTL seconds: counting open fds lists /proc/self/fd, which
    under a flood of thousands of connections cost a scrape tens of milliseconds (and the daemon's GIL)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._cached: tuple[float, list[Any]] | None = None
        self._cache_lock = threading.Lock()
        super().__init__(registry=registry)

    def collect(self) -> Iterable[Any]:
        with self._cache_lock:
            now = time.monotonic()
            if self._cached is None or now - self._cached[0] > PROCESS_TTL:
                self._cached = (now, list(super().collect()))
            return list(self._cached[1])


#: how stale the process_* metrics may be (Prometheus scrapes every 15 s or so)
PROCESS_TTL = 5.0

# `*_created` series double every counter's series count and carry nothing a dashboard uses.
disable_created_metrics()  # type: ignore[no-untyped-call]


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.restores = Counter("activator_restores", "Instances restored from a checkpoint", ["service"],
                                registry=r)
        self.restore_failures = Counter("activator_restore_failures", "Restores that failed", ["service"],
                                        registry=r)
        self.cold_starts = Counter("activator_cold_starts",
                                   "Instances cold-started from the image after a failed restore", ["service"],
                                   registry=r)
        self.restore_duration = Histogram("activator_restore_duration_seconds",
                                          "Time to restore an instance until it accepts connections",
                                          ["service"], buckets=LATENCY_BUCKETS, registry=r)
        self.first_connection_wait = Histogram(
            "activator_first_connection_wait_seconds",
            "Time a connection waited for an instance to be restored or started", ["service"],
            buckets=LATENCY_BUCKETS, registry=r)
        self.instances = Gauge("activator_instances", "Live instances", ["service"], registry=r)
        self.open_connections = Gauge("activator_open_connections", "Open client connections", ["service"],
                                      registry=r)
        self.connections = Counter("activator_connections", "Client connections accepted", ["service"],
                                   registry=r)
        self.connection_errors = Counter("activator_connection_errors",
                                         "Client connections closed because no instance could serve them",
                                         ["service"], registry=r)
        self.proxied_bytes = Counter("activator_proxied_bytes", "Bytes proxied",
                                     ["service", "direction"], registry=r)
        self.idle_reaps = Counter("activator_idle_reaps", "Instances killed after their idle timeout",
                                  ["service"], registry=r)
        self.checkpoint_builds = Counter("activator_checkpoint_builds", "Checkpoints built", ["service"],
                                         registry=r)
        self.checkpoint_build_duration = Histogram("activator_checkpoint_build_duration_seconds",
                                                   "Time to build a checkpoint", ["service"],
                                                   buckets=BUILD_BUCKETS, registry=r)

        self.waiting = Gauge("activator_waiting_connections", "Connections waiting for an instance to be ready",
                             ["service"], registry=r)
        self.starting = Gauge("activator_starting_instances", "Instances being restored or started", ["service"],
                              registry=r)
        self.backoff = Gauge("activator_backoff_seconds",
                             "Seconds until a new instance may be attempted: after failed starts, or until the next "
                             "checkpoint build of a service without one (0: not backing off)",
                             ["service"], registry=r)
        self.restore_backoff = Gauge("activator_restore_backoff_seconds",
                                     "Seconds until restores are tried again after a failed one (0: not backing off)",
                                     ["service"], registry=r)
        self.start_failures = Counter("activator_start_failures",
                                      "Attempts to bring up an instance that ended with none", ["service"], registry=r)
        self.instance_failures = Counter("activator_instance_failures",
                                         "Instances removed because their app stopped accepting connections",
                                         ["service"], registry=r)
        self.ignored = Counter("activator_ignored_connections",
                               "Connections that closed before sending a byte or waiting out wake_grace: they "
                               "woke nothing (port scans, health probes that only connect)", ["service"], registry=r)
        self.idle_closes = Counter("activator_client_idle_closes",
                                   "Connections closed after client_idle_timeout without a byte either way, or "
                                   "client_silent_timeout without a byte from the client",
                                   ["service"], registry=r)
        self.checkpoint_build_failures = Counter("activator_checkpoint_build_failures",
                                                 "Checkpoint builds that failed (the service waits and retries)",
                                                 ["service"], registry=r)
        self.checkpoint_pages_bytes = Gauge("activator_checkpoint_pages_bytes",
                                            "Memory pages in the service's current checkpoint (what a restore copies)",
                                            ["service"], registry=r)
        self.checkpoint_created = Gauge("activator_checkpoint_created_timestamp_seconds",
                                        "When the service's current checkpoint was built (Unix time)", ["service"],
                                        registry=r)
        self.checkpoint_outdated = Gauge(
            "activator_checkpoint_outdated",
            "1 when the service's image reference now names another image than its checkpoint was built from "
            "(checked every minute; the next start or `activator checkpoint --rebuild` rebuilds it)",
            ["service"], registry=r)
        self.standby_thaws = Counter("activator_standby_thaws",
                                     "Instances started by thawing a standby (restored ahead and frozen)",
                                     ["service"], registry=r)
        self.standby_instances = Gauge("activator_standby_instances",
                                       "Standbys: instances restored ahead and frozen, waiting to be thawed",
                                       ["service"], registry=r)
        self.standby_memory = Gauge("activator_standby_memory_bytes",
                                    "Memory the service's standbys are charged (their memory cgroups)", ["service"],
                                    registry=r)
        self.idle_cpu_busy = Counter(
            "activator_idle_cpu_busy", "Idle checks that kept an instance with no connection because its app was "
            "still using CPU (idle_cpu_below)", ["service"], registry=r)
        self.udp_dropped = Counter("activator_udp_dropped",
                                   "UDP datagrams dropped: past udp_queue or udp_held_bytes while their flow "
                                   "waited for an instance, or refused by admission control", ["service"],
                                   registry=r)
        self.udp_replies_dropped = Counter(
            "activator_udp_replies_dropped", "UDP replies dropped because the client had not sent enough to be owed "
            "them (udp_reply_ratio times its bytes: a forged source makes no amplifier), on both paths",
            ["service"], registry=r)
        self.udp_unanswered = Counter(
            "activator_udp_unanswered_flows", "UDP flows that ended before the app answered them (a forged source's "
            "are), or were ended early to make room for newer ones (per source and per service)", ["service"],
            registry=r)
        self.waiting_pages = Counter("activator_waiting_pages",
                                     "Browsers' page loads answered with the 'starting' page while they waited for an "
                                     "instance (waiting_page)", ["service"], registry=r)
        self.kept_warm = Gauge("activator_kept_warm",
                               "1 while a keep_alive_schedule window keeps the service warm", ["service"], registry=r)
        self.probes = Counter(
            "activator_probes", "Health checks answered by the activator itself (probes), by kind (http, tcp) and "
            "answer (recorded: the template's, nothing running; live: asked of a running instance; unavailable: a "
            "503, the service cannot serve now; accepted: a TCP check)", ["service", "kind", "answer"], registry=r)
        self.pre_stop = Counter("activator_pre_stop",
                                "pre_stop requests made to instances before they were asked to stop, by result "
                                "(ok: a 2xx/3xx answer; failed; timeout)", ["service", "result"], registry=r)
        self.build_info = Gauge("activator_build_info", "Always 1; the versions activator runs with",
                                ["version", "python", "criu", "runc", "kernel"], registry=r)
        CachedProcessCollector(registry=r)  # process_cpu_seconds_total, resident memory, open fds, ...
        PlatformCollector(registry=r)
        self.network_repairs = Counter("activator_network_repairs",
                                       "Instance-network rules found missing (a firewall reload, a Docker restart) "
                                       "and put back, by what (nftables, iptables)", ["what"], registry=r)
        self.kernel_path_failures = Counter("activator_kernel_path_failures",
                                            "Steering changes the kernel refused (the service is served through "
                                            "the activator until the rules are repaired)", ["service"], registry=r)
        self.handoff_repairs = Counter("activator_handoff_repairs",
                                       "A handoff service's listening socket found shut down (by an app it was "
                                       "handed to) and made to listen again", ["service"], registry=r)
        self.handoff_replaced = Counter("activator_handoff_sockets_replaced",
                                        "A handoff service's listening socket found deaf for good by an app it was "
                                        "handed to (a socket filter, a device binding, TCP-MD5 keys): its "
                                        "instances killed, the socket replaced",
                                        ["service"], registry=r)
        self.handoff_backlog = Counter("activator_handoff_backlog_repairs",
                                       "A handoff service's listening socket found with a smaller listen backlog "
                                       "(an app called listen() on it) and given its own back", ["service"],
                                       registry=r)
        self.control_actions = Counter("activator_control_actions",
                                       "Runtime control by the operator (activator wake|scale|stop|start)",
                                       ["service", "action"], registry=r)
        self.checkpoint_transfers = Counter(
            "activator_checkpoint_transfers",
            "Checkpoint images moved through settings.checkpoint_registry, by direction (pull, push) and result "
            "(ok; absent: the registry had none, so it was built here; failed)", ["service", "direction", "result"],
            registry=r)
        self.agent_checks = Counter("activator_agent_checks",
                                    "Balancer agent checks answered, by service and answer (up, drain, down)",
                                    ["service", "answer"], registry=r)
        self.reloads = Counter("activator_reloads", "Configuration reloads, by result (applied, refused)",
                               ["result"], registry=r)
        self.rejected = Counter("activator_rejected_connections",
                                "Connections closed at once by admission control", ["service", "reason"], registry=r)

    def for_service(self, name: str) -> ServiceMetrics:
        # Every other field of ServiceMetrics is the child of the family of the same name here.
        special: dict[str, Any] = {  # SPECIAL
            "bytes_in": self.proxied_bytes.labels(name, "in"),
            "bytes_out": self.proxied_bytes.labels(name, "out"),
            "rejected": {reason: self.rejected.labels(name, reason) for reason in REJECT_REASONS},
            "pre_stop": {result: self.pre_stop.labels(name, result) for result in PRE_STOP_RESULTS},
            "probes": {f"{k}/{a}": self.probes.labels(name, k, a) for k, a in PROBE_LABELS},
        }
        return ServiceMetrics(**{
            f.name: special[f.name] if f.name in special else getattr(self, f.name).labels(name)
            for f in fields(ServiceMetrics)
        })

    def forget_service(self, name: str) -> None:
        """A service removed by a reload leaves no series behind."""
        for f in fields(ServiceMetrics):
            if f.name not in SPECIAL:  # the families labelled by service alone
                with contextlib.suppress(KeyError):
                    getattr(self, f.name).remove(name)
        for direction in ("in", "out"):
            with contextlib.suppress(KeyError):
                self.proxied_bytes.remove(name, direction)
        for reason in REJECT_REASONS:
            with contextlib.suppress(KeyError):
                self.rejected.remove(name, reason)
        for result in PRE_STOP_RESULTS:
            with contextlib.suppress(KeyError):
                self.pre_stop.remove(name, result)
        for kind, answer in PROBE_LABELS:
            with contextlib.suppress(KeyError):
                self.probes.remove(name, kind, answer)
        for family in (self.handoff_repairs, self.handoff_replaced, self.handoff_backlog, self.kernel_path_failures):
            with contextlib.suppress(KeyError):
                family.remove(name)

    def endpoint(self, addr: ListenAddress) -> ScrapeServer:
        """The scrape endpoint (its own thread, bounded: scrape.py), not yet started."""
        return ScrapeServer(self.registry, addr.host, addr.port)
