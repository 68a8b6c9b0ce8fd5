"""A service's kernel path: the bridge between its pool of instances (service.py) and the host network's
steering rules (net/network.py)."""

from __future__ import annotations

import logging

from activator.checkpoints.instance import Instance
from activator.config.service import ServiceConfig
from activator.net.network import SYN_TIMEOUT, Backend, HostNetwork, connections

log = logging.getLogger("activator.network")


class ServiceSteering:
    """One service's kernel path: its rule lists exactly the instances Service says are steerable."""

    half_open_timeout = float(SYN_TIMEOUT)
    address: tuple[str, int] | None = None  # the kernel steers to each instance's own address

    def __init__(self, network: HostNetwork, config: ServiceConfig) -> None:
        self.network = network
        self.config = config
        self.failed = False  # the last change did not reach the kernel (logged once until one does)
        self.failures = 0

    def set(self, instances: list[Instance], starting: int = 0) -> None:
        """Least loaded first: the rule's round robin starts over at its first backend whenever it is rebuilt
        (an instance came or went), so that one must be the one with the fewest connections, not whichever was
        first before. A failure never reaches the caller (a service's state machine, a shutdown): the service
        stays on the activator's own listener for whatever the kernel no longer steers, the network is marked
        for repair, and the next check puts back what is asked here."""
        ordered = sorted(instances, key=lambda i: i.connections)
        backends = [Backend(att.ip, self.config.port, att.mark) for i in ordered
                    if (att := i.sandbox.attachment) is not None]
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

    def open_count(self, inst: Instance) -> tuple[int, int]:
        """(open, half-open); on a conntrack error, one open: an instance is never reaped on a count not made."""
        att = inst.sandbox.attachment
        if att is None:
            return (0, 0)
        try:
            return connections(att.base).get(att.mark, (0, 0))
        except Exception as e:
            log.warning("instance=%s: counting its connections failed (%s); kept for now", inst.name, e)
            return (1, 0)
