"""A service's definition: ServiceConfig (every key under `services.NAME:`), what relates its keys, and the
fingerprint of what shapes its checkpointed process.

Pure: no I/O.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import signal
from dataclasses import asdict, dataclass, fields, is_dataclass
from typing import Any

from . import schedule
from .addresses import Hosts, Listen, ListenAddress
from .declare import Section, key
from .kinds import (
    DAY,
    HOUR,
    MINUTE,
    Args,
    AutoFlag,
    Duration,
    Flag,
    Int,
    MiB,
    Number,
    Percent,
    Protocols,
    Schedule,
    Size,
    Text,
)
from .mounts import Tmpfs, TmpfsMount, Volume, Volumes
from .probes import Probe, Probes, probe_paths
from .process import Capabilities, Environment, Ulimits
from .sections import Backoff, PreStop, Readiness, Resources, Warmup

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,39}$"
NAME_RE = re.compile(NAME_PATTERN)

FALLBACKS = ("cold-start", "none")
NETWORKS = ("bridge", "none")
PROXY_PROTOCOLS = ("v1", "v2")
WAKE_ON = ("data", "connect")
REFUSALS = ("close", "http-503")
RESTORE_MEMORY = ("copy", "map", "map-always")
USERNS = ("private", "host")
#: capabilities over the network namespace, which a user namespace of the instance does not own
NETWORK_CAPS = frozenset({"NET_RAW", "NET_ADMIN"})
#: `seccomp:` values that are not paths
SECCOMP_DEFAULT, SECCOMP_UNCONFINED = "default", "unconfined"


@dataclass(frozen=True)
class ServiceConfig:
    name: str  # the key under `services:`, not a key of its own
    image: str = key(Text(hint="an image reference like app:1.2"), shapes=True,
                     doc="a local Docker image (the image source; nothing runs under Docker)")
    listen: tuple[ListenAddress, ...] = key(Listen(), doc="HOST:PORT to accept clients on, or a list of them")
    port: int = key(Int(1, 65535), shapes=True, doc="the port the app listens on inside its container")
    protocol: tuple[str, ...] = key(
        Protocols(), ("tcp",), shapes=True,
        doc="tcp, udp, or [tcp, udp] (a DNS server): for udp the activator listens for datagrams on the same "
            "addresses; the first one from a client wakes the service, and it and those that follow are held "
            "(udp_queue) and delivered in order")
    udp_flow_timeout: float = key(
        Duration(1, HOUR), 30.0,
        doc="a UDP flow (one client address and port) with no datagram either way for this long is over: its "
            "instance may go idle, and its next datagram is a new flow (on the kernel path: its conntrack timeout)")
    udp_queue: int = key(Int(1, 100_000), 64,
                         doc="datagrams held per UDP flow while its instance starts; past it they are dropped and "
                             "counted (activator_udp_dropped_total)")
    udp_held_bytes: int = key(
        Size(MiB, 2**34), 4 * MiB,
        doc="bytes of datagrams held for the whole service (all its flows) while an instance starts; past it they "
            "are dropped and counted (activator_udp_dropped_total)")
    udp_reply_ratio: float = key(
        Number(0, 1_000_000), 3.0,
        doc="bytes the app may send a UDP client per byte that client sent (RFC 9000's anti-amplification "
            "rule), so a datagram with a forged source cannot aim the app's answers at a victim; replies past it "
            "are dropped and counted (activator_udp_replies_dropped_total). Raise it for protocols whose answers "
            "are much larger than their requests")
    command: tuple[str, ...] | None = key(Args(), None, nullable=True, shapes=True,
                                          doc="overrides the image's Cmd (like compose)")
    entrypoint: tuple[str, ...] | None = key(Args(), None, nullable=True, shapes=True,
                                             doc="overrides the image's Entrypoint (like compose)")
    environment: tuple[tuple[str, str], ...] = key(Environment(), (), shapes=True,
                                                    doc="variables added to the image's environment")
    working_dir: str | None = key(Text(pattern=r"/.*", hint="an absolute path"), None, nullable=True, shapes=True,
                                  doc="overrides the image's WorkingDir")
    user: str | None = key(Text(pattern=r"[A-Za-z0-9_.-]+(:[A-Za-z0-9_.-]+)?", hint="USER or USER:GROUP"), None,
                           nullable=True, shapes=True, doc="overrides the image's User")
    seccomp: str = key(
        Text(pattern=r"default|unconfined|/.+", hint="default, unconfined or an absolute path to a profile"),
        SECCOMP_DEFAULT, shapes=True,
        doc="syscall filter: default (Docker's default profile), unconfined, or a Docker-format profile file")
    network: str = key(Text(choices=NETWORKS), "bridge", shapes=True,
                       doc="bridge: an address on activator's bridge, outbound access, and connections steered to "
                           "instances in the kernel; none: loopback only, every byte through the activator")
    egress: bool = key(Flag(), True, doc="with network: bridge, whether the app may open connections out")
    userns: str = key(Text(choices=USERNS), "private", shapes=True,
                      doc="private: the app runs in a user namespace of its own (root in it is an unprivileged "
                          "uid on the host, its range kept in state_dir/userns.json); host: no user namespace, "
                          "root in the instance is root on the host (only for an app that needs what a user "
                          "namespace cannot give it, such as a host device)")
    cap_add: tuple[str, ...] = key(Capabilities(), (), shapes=True,
                                   doc="capabilities added to the default set (Docker's, less NET_RAW), e.g. "
                                       "[NET_RAW] for an app that sends raw packets")
    cap_drop: tuple[str, ...] = key(Capabilities(all_ok=True), (), shapes=True,
                                    doc="capabilities taken from the default set, or [ALL]")
    extra_hosts: tuple[tuple[str, str], ...] = key(Hosts(), (), shapes=True,
                                                    doc="extra /etc/hosts entries for the app, {name: address}")
    hostname: str | None = key(Text(pattern=r"[A-Za-z0-9](?:[A-Za-z0-9.-]{0,62})", hint="a host name"), None,
                               nullable=True, shapes=True, doc="the app's host name (null: the service's name)")
    read_only: bool = key(Flag(), False, shapes=True,
                          doc="mount the image's root filesystem read-only (give the app tmpfs or volumes to write)")
    tmpfs: tuple[TmpfsMount, ...] = key(
        Tmpfs(), (), shapes=True,
        doc="PATH[:OPTIONS]: an empty tmpfs per instance (rw,noexec,nosuid,nodev; size=, mode=, exec, ...); what "
            "the app wrote there before the checkpoint is in every instance's")
    ulimits: tuple[tuple[str, int, int], ...] = key(
        Ulimits(), (), shapes=True, doc="resource limits of the app's processes, {nofile: {soft: N, hard: N}, ...}")
    depends_on: tuple[str, ...] = key(
        Args(), (), shapes=True,
        doc="services of this file this one uses: woken with it, kept while an instance of this one lives, and "
            "reachable from it by name (their listen port, through the gateway address)")
    volumes: tuple[Volume, ...] = key(
        Volumes(), (), shapes=True,
        doc="SOURCE:TARGET[:OPTIONS]: a host path, or a volume name kept in state_dir/volumes (filled from the "
            "image on first use, like Docker's), bound into the template and every instance; its data outlives them. "
            "OPTIONS (comma-separated): ro or rw; for a host path, U (long form chown: true: the directory is "
            "chowned to the app's user as the instance sees it) or idmap (an idmapped bind: host owners kept, the "
            "app sees them as its own); docs/volumes.md")
    share_memory: bool | str = key(
        AutoFlag(), "auto",
        doc="let the kernel merge identical pages of this service's instances (KSM): much less memory per extra "
            "instance, at some CPU; a side channel between everything merged, so auto means: only when this is "
            "the file's only service")
    restore_memory: str = key(
        Text(choices=RESTORE_MEMORY), "copy",
        doc="copy: a restore reads the checkpoint's memory into each instance; map: long runs of the app's private "
            "memory are mapped copy-on-write from the checkpoint's page files instead, so a restore copies almost "
            "nothing and pages no instance writes are one copy shared by all of them, but memory the app discards "
            "with MADV_DONTNEED reads the checkpoint's bytes again instead of zeros: an app whose allocator counts "
            "on zeros there (jemalloc: Redis) is found in the checkpoint and restored by copy, with a warning; "
            "map-always: map even then (only an app tested under it, e.g. jemalloc with purging off). "
            "docs/restore-memory.md")
    stateful: bool | str = key(
        AutoFlag(), "auto",
        doc="the app keeps what is in its volumes in memory (a database): one instance at a time, and its "
            "checkpoint made again (from the volumes as that instance left them) before the next one; auto: when "
            "its app held a file of a writable volume open for writing when it was checkpointed")
    readiness: Readiness = key(Section(Readiness), factory=Readiness, doc="when the template is ready to dump")
    warmup: Warmup = key(Section(Warmup), factory=Warmup, doc="requests run against the template before the dump")
    idle_timeout: float = key(Duration(0.01, 30 * DAY), 300.0,
                              doc="an instance with no open connection for this long is killed")
    idle_cpu_below: float | None = key(
        Percent(64.0), None, nullable=True,
        doc="an instance is idle only if its processes also used less than this share of one CPU over the "
            "idle window (2%, or 0.02): an app still working on its own (a batch job, a long request's tail "
            "after its client left) is not killed; it is looked at again an idle_timeout later (null: connections "
            "alone decide)")
    probes: tuple[Probe, ...] = key(
        Probes(), (), shapes=True,
        doc="health checks the activator answers itself, without waking the service or keeping an instance alive: "
            "[{http: /healthz, from: [10.0.0.0/8]}] answers a GET or HEAD of /healthz from those addresses with what "
            "the template answered at build time while nothing runs (and asks a running instance itself while one "
            "does); [{tcp: true, from: [...]}] lets a connection from those addresses that sends nothing be a "
            "check, never a wake. Anything else from those addresses is served as usual")
    pre_stop: PreStop = key(Section(PreStop), factory=PreStop,
                            doc="an HTTP request made to an instance before it is asked to stop")
    keep_alive_schedule: tuple[schedule.Window, ...] = key(
        Schedule(), (),
        doc="hours the service is kept warm, in the host's time zone: during each window one instance is "
            "started ahead of any client and none is reaped below one (as min_instances: 1); outside, idle_timeout "
            "applies. Windows are '[DAYS] HH:MM-HH:MM', e.g. ['mon-fri 08:00-18:00', 'sat 10:00-12:00']")
    restore_timeout: float = key(Duration(0.01, HOUR), 10.0, doc="longest a restore may take (CRIU's restore)")
    connect_timeout: float = key(Duration(0.01, HOUR), 5.0,
                                 doc="from restored to accepting connections; past it the instance is removed")
    resources: Resources = key(Section(Resources), factory=Resources, doc="limits per instance")
    min_instances: int = key(Int(0, 256), 0, doc="instances kept running even when idle")
    prepared_slots: int = key(Int(0, 16), 1,
                              doc="instances prepared ahead but for their process (namespace, network, mounts): a "
                                  "restore then is one request to a CRIU already waiting in it (~1 MB each)")
    standby: int = key(Int(0, 16), 0,
                       doc="instances restored ahead and kept frozen (no CPU, their timers stopped): the first "
                           "connection that needs a new instance thaws one in well under a millisecond instead of "
                           "waiting for a restore, and a new standby is restored behind it. Each costs the memory "
                           "of an instance (shared between them and the running ones with share_memory)")
    max_instances: int = key(Int(1, 256), 1, doc="most instances restored from the one checkpoint at once")
    target_connections: int = key(Int(1, 1_000_000), 100,
                                  doc="open connections per instance before another one is restored")
    max_connections: int | None = key(
        Int(1, 10_000_000), None, nullable=True,
        doc="open connections for the whole service; past it, closed at once (null: as many as the daemon's "
            "file descriptor limit allows)")
    max_waiting: int = key(Int(0, 1_000_000), 1000,
                           doc="connections waiting for an instance; past it, closed at once")
    backoff: Backoff = key(Section(Backoff), factory=Backoff, doc="after failed starts, no new attempt before this")
    fallback: str = key(Text(choices=FALLBACKS), "cold-start",
                        doc="after a failed restore: cold-start (boot from the image) or none")
    refuse_with: str | None = key(
        Text(choices=REFUSALS), None, nullable=True,
        doc="how a refused client (no checkpoint, backing off, stopped, over a limit) is told: the connection "
            "closed, or http-503: an HTTP 503 answer with Retry-After first (null: http-503 for an http: true "
            "service, else close)")
    http: bool = key(Flag(), False,
                     doc="the service speaks HTTP/1.x: refused clients get a 503 with Retry-After (unless refuse_with "
                         "says close), and waiting_page may answer browsers during a slow start")
    waiting_page: float | None = key(
        Duration(0, 10 * MINUTE), None, nullable=True,
        doc="with http: true, a browser's page load (a GET that accepts text/html) still waiting for an instance "
            "after this long gets a small 'starting' page that reloads itself (503, Retry-After: 1) while the "
            "start goes on; other clients keep waiting (null: every client waits)")
    proxy_protocol: str | None = key(Text(choices=PROXY_PROTOCOLS), None, nullable=True,
                                     doc="send a PROXY protocol header (v1 or v2) to the app before client bytes")
    handoff: bool = key(
        Flag(), False,
        doc="the app accepts straight from the activator's listening socket, handed into each restored instance "
            "in place of the one it listened on at dump time (a patched CRIU): warm connections reach the app as "
            "a direct connection would, with no NAT, bridge or copy, and the kernel spreads them over the "
            "instances. The activator sees only the connections that wake the service, so it needs exactly one "
            "listen address and takes no proxy_protocol, max_connections or client_idle_timeout")
    wake_on: str = key(Text(choices=WAKE_ON), "data",
                       doc="what wakes a service with no instance: a connection's first byte, or after wake_grace "
                           "of silence (data), or the connection itself (connect)")
    wake_grace: float | None = key(
        Duration(0, HOUR), 0.5, nullable=True,
        doc="with wake_on: data, a connection silent this long wakes the service anyway (server-speaks-first "
            "protocols); null: only data wakes it")
    client_idle_timeout: float | None = key(
        Duration(0.1, 30 * DAY), None, nullable=True,
        doc="a connection with no bytes either way for this long is closed (null: never); on the kernel path, "
            "its conntrack idle timeout")
    client_silent_timeout: float | None = key(
        Duration(0.1, 30 * DAY), 60.0, nullable=True,
        doc="a connection whose client has not sent one byte this long after it was accepted is closed, so "
            "connections that never speak cannot pin instances; quiet sessions that have exchanged data are not "
            "affected (null: never; through the activator only: the kernel path does not see the bytes)")
    stop_signal: str | None = key(
        Text(pattern=r"(SIG)?[A-Z0-9+-]+|[0-9]+", hint="a signal name like SIGTERM, or a number"), None,
        nullable=True, doc="what an instance is asked to stop with when it is reaped or drained (null: the "
                           "image's STOPSIGNAL, else SIGTERM)")
    stop_grace: float = key(Duration(0, 5 * 60), 10.0,
                            doc="how long a stopping instance's app may take to exit before it is killed; an app "
                                "that does not handle the stop signal is killed at once")

    def __post_init__(self) -> None:
        if not NAME_RE.fullmatch(self.name):
            raise ValueError("service names are 1-40 of a-z, 0-9, '_' and '-', starting with a letter or digit")
        if self.stop_signal is not None:
            signal_number(self.stop_signal)  # raises ValueError naming the problem
        for dep in self.depends_on:
            if dep == self.name:
                raise ValueError(f"depends_on: '{dep}' is this service itself")
        if self.min_instances > self.max_instances:
            raise ValueError(f"min_instances ({self.min_instances}) must not exceed max_instances "
                             f"({self.max_instances})")
        if self.standby > self.max_instances:
            raise ValueError(f"standby ({self.standby}) must not exceed max_instances ({self.max_instances}): a "
                             "standby is thawed into one of them")
        if self.stateful is True and self.standby:
            raise ValueError("stateful: true makes the checkpoint again after each instance, so no instance can be "
                             "restored ahead; set standby: 0")
        if self.stateful is True and self.max_instances > 1:
            raise ValueError(f"stateful: true runs one instance at a time; max_instances ({self.max_instances}) "
                             "must be 1")
        if "udp" in self.protocol:
            self._check_udp()
        if self.waiting_page is not None and not self.http:
            raise ValueError("waiting_page answers HTTP requests; set http: true (the service speaks HTTP/1.x) or "
                             "remove waiting_page")
        if self.handoff:
            self._check_handoff()
        netcaps = sorted(set(self.cap_add) & NETWORK_CAPS)
        if netcaps and self.userns == "private":
            raise ValueError(f"cap_add: {', '.join(netcaps)} gives nothing in the instance's user namespace (its "
                             "network namespace is made outside it, so no capability over the network is held); "
                             "set 'userns: host' for an app that needs it")

    def _check_udp(self) -> None:
        if not self.listen:
            raise ValueError("protocol: udp needs listen addresses: the activator binds its UDP sockets itself "
                             "(systemd's datagram sockets are not taken over)")
        if self.handoff:
            raise ValueError("handoff: true hands over a TCP listening socket; use it without udp in protocol")
        if self.proxy_protocol is not None:
            raise ValueError("proxy_protocol: the PROXY header is written into TCP streams only; remove it or use "
                             "protocol: tcp")

    @property
    def refusal(self) -> str:
        """How refused clients are told (refuse_with, its default decided by http)."""
        return self.refuse_with or ("http-503" if self.http else "close")

    def _check_handoff(self) -> None:
        if len(self.listen) > 1:
            raise ValueError("handoff: true hands one listening socket to the app; give the service one listen "
                             f"address (it has {len(self.listen)})")
        if self.standby:
            raise ValueError("handoff: true: a standby's app would accept from the service's socket between its "
                             "restore and its freeze; set standby: 0 or handoff: false")
        if self.probes:
            raise ValueError("handoff: true: the apps accept every connection themselves, so the activator cannot "
                             "answer probes; remove probes or set handoff: false")
        if self.pre_stop.http_path is not None:
            raise ValueError("handoff: true: a reaped instance is killed while frozen, so that it takes no connection "
                             "from the service's socket, and cannot be asked anything first; remove pre_stop or set "
                             "handoff: false")
        unseen = [k for k, v in (("proxy_protocol", self.proxy_protocol), ("max_connections", self.max_connections),
                                 ("client_idle_timeout", self.client_idle_timeout)) if v is not None]
        if unseen:
            raise ValueError(f"handoff: true: the app accepts its connections itself, so the activator cannot apply "
                             f"{unseen[0]}; remove it or set handoff: false")

    def checkpoint_fingerprint(self) -> str:
        """Hash of everything that shapes the checkpointed process (keys declared with shapes=True)."""
        return hashlib.sha256(json.dumps(_shaping(self), sort_keys=True).encode()).hexdigest()[:16]


def signal_number(name: str) -> int:
    """SIGTERM, TERM, 15 -> 15 (what Docker accepts for STOPSIGNAL)."""
    if name.isdigit():
        n = int(name)
        if n in set(signal.Signals):
            return n
    else:
        with contextlib.suppress(KeyError):
            return int(signal.Signals[name if name.startswith("SIG") else f"SIG{name}"])
    raise ValueError(f"'{name}' is not a signal (stop_signal: SIGTERM, SIGINT, SIGQUIT, ... or a number)")


#: process-shaping keys added after checkpoints were made without them
# userns: Origin.userns (the range itself) decides
ADDED_LATER = frozenset({"volumes", "cap_add", "cap_drop", "hostname", "read_only", "tmpfs", "ulimits", "depends_on",
                         "readiness.command", "userns", "probes", "protocol"})


def _plain(value: Any) -> Any:
    """JSON-able: dataclasses as dicts, tuples of them as lists."""
    if isinstance(value, Volume):
        return value.plain()
    if is_dataclass(value) and not isinstance(value, type):
        return asdict(value)
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    return value


def _shaping(obj: Any, at: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for f in fields(obj):
        value = getattr(obj, f.name)
        if f.metadata.get("shapes"):
            if at + f.name in ADDED_LATER and value == f.default:
                continue  # absent from fingerprints made before the key existed: those stay current
            out[f.name] = probe_paths(value) if f.name == "probes" else _plain(value)
        elif is_dataclass(value) and (inner := _shaping(value, f"{at}{f.name}.")):
            out[f.name] = inner
    return out
