"""The kernel mode (steering.py): a DNAT rule on the host network (net/network.py) sends a service's new connections
and UDP flows straight to its ready instances on the bridge; conntrack and the table's per-instance counters
(packets, bytes, connections that completed their handshake) say what each had."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from activator.checkpoints.instance import Instance
from activator.config.service import ServiceConfig
from activator.core import reaping
from activator.core.clock import Clock
from activator.net.network import SYN_TIMEOUT, Backend, HostNetwork, connections
from activator.net.rules import ident
from activator.net.sampling import Sample as KernelSample
from activator.net.sampling import Samples

from .steering import InstanceSample, Mode, Sample, Totals, counted_since

log = logging.getLogger("activator.network")

ZERO = KernelSample()  # an instance not sampled before: everything it has is new


class KernelMode:
    """One service's kernel path: its rule lists exactly the instances the service says are steerable."""

    name = "kernel"
    steers = True
    half_open_timeout = float(SYN_TIMEOUT)
    address: tuple[str, int] | None = None  # the kernel steers to each instance's own address

    def __init__(self, network: HostNetwork, config: ServiceConfig) -> None:
        self.network = network
        self.config = config
        self.failed = False  # the last change did not reach the kernel (logged once until one does)
        self.failures = 0
        self.stopped = False
        self._seen: dict[Instance, KernelSample] = {}  # each instance's counters as last sampled
        self._steered: list[Backend] | None = None  # what the rule was last set to (None: not yet, or it failed)

    def reaches(self, inst: Instance) -> bool:
        return inst.sandbox.attachment is not None

    def set(self, instances: list[Instance], starting: int = 0) -> None:
        """Least loaded first: the rule's round robin starts over at its first backend whenever it is rebuilt
        (an instance came or went), so that one must be the one with the fewest connections, not whichever was
        first before. A failure never reaches the caller (a service's state machine, a shutdown): the service
        stays on the activator's own listener for whatever the kernel no longer steers, the network is marked
        for repair, and the next check puts back what is asked here."""
        if self.stopped:  # its chain is gone with the old definition (HostNetwork.forget)
            return
        ordered = sorted(instances, key=lambda i: i.connections)
        backends = [Backend(att.ip, self.config.port, att.mark) for i in ordered
                    if (att := i.sandbox.attachment) is not None]
        if backends == self._steered:  # a start or a count that changes nothing: no transaction
            return
        self._steered = None
        try:
            self.network.steer(self.config.name, self.config.listen, backends,
                               exempt=tuple(n for p in self.config.probes for n in p.sources),
                               protocols=self.config.protocol)
        except Exception as e:
            self.failures += 1
            self.network.broken = True
            if not self.failed:
                log.warning("service=%s kernel path: steering failed (%s); its clients reach the activator's own "
                            "listener until the rules are repaired", self.config.name, e)
            self.failed = True
        else:
            self.failed = False
            self._steered = backends

    async def sample(self, instances: list[Instance], shared: Samples | None, arrived: int) -> Sample:
        if shared is None:
            return Sample()
        out: dict[Instance, InstanceSample] = {}
        for inst in instances:
            att = inst.sandbox.attachment
            s = shared.by_mark.get(att.mark) if att is not None else None
            if s is None:
                continue
            seen = self._seen.get(inst, ZERO)
            # a counter below the last one was put back from zero (a repaired table): all of it is new
            out[inst] = InstanceSample(
                open=s.open, active=s.packets != seen.packets, new=counted_since(s.served, seen.served),
                bytes_in=max(0, s.bytes_in - seen.bytes_in), bytes_out=max(0, s.bytes_out - seen.bytes_out))
            self._seen[inst] = s
        for gone in set(self._seen) - set(instances):
            del self._seen[gone]
        if self.stopped:  # the service's counters are the current definition's to fold
            return Sample(out)
        key = ident(self.config.name)
        totals = Totals(shared.steered.get(key, 0), shared.rejected.get(key, 0), shared.amplified.get(key, 0))
        return Sample(out, totals)

    async def retire(self, inst: Instance, clock: Clock, resteer: Callable[[], None]) -> int:
        """Out of the rule first, then counted. A handshake under way when the rule changed (a SYN steered to it
        just before) must finish here, or the client loses its connection; a spoofed SYN never finishes, and goes
        after half_open_timeout. Half-open entries are therefore waited out, not counted: no new one can come."""
        resteer()
        # A SYN DNATed just before the rule changed may not have its conntrack entry confirmed yet (a dump shows
        # confirmed ones only): let it settle, or that client's SYN would meet a dead instance and be retried a
        # second later.
        await clock.sleep(reaping.WITHDRAW_SETTLE)
        deadline = reaping.retire_deadline(clock.now(), self.half_open_timeout)
        while True:
            still_open, half_open = await asyncio.to_thread(self.open_count, inst)
            verdict = reaping.retired(still_open=still_open, half_open=half_open, spliced=inst.track.spliced,
                                      past_deadline=clock.now() > deadline)
            if inst.track.stopping or verdict is not None:
                return still_open
            await clock.sleep(reaping.RECOUNT_EVERY)

    def open_count(self, inst: Instance) -> tuple[int, int]:
        """Blocking: (open, half-open); on a conntrack error, one open: never reaped on a count not made."""
        att = inst.sandbox.attachment
        if att is None:
            return (0, 0)
        try:
            return connections(att.base).get(att.mark, (0, 0))
        except Exception as e:
            log.warning("instance=%s: counting its connections failed (%s); kept for now", inst.name, e)
            return (1, 0)

    def carry_from(self, previous: Mode) -> None:
        pass  # its counts are the kernel's, cumulative, and the service carries those (Service.totals)

    def guard(self) -> None:
        """The rules themselves are the host network's to keep (watchers.keep_network)."""

    def stop(self) -> None:
        self.stopped = True
