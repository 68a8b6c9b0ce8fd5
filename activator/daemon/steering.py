"""A service's kernel path: the bridge between its pool of instances (service.py) and the host network's
steering rules (net/network.py)."""

from __future__ import annotations

import logging
from concurrent.futures import Future, ThreadPoolExecutor

from activator.checkpoints.instance import Instance
from activator.config.model import ServiceConfig
from activator.net.network import SYN_TIMEOUT, Backend, HostNetwork, connections

log = logging.getLogger("activator.network")

#: applies the changes that may come late (an instance added): one thread for every service, so each service's
#: changes reach the kernel in the order they were asked for (libnftables is called without the GIL)
_BACKGROUND = ThreadPoolExecutor(max_workers=1, thread_name_prefix="steering")


class ServiceSteering:
    """One service's kernel path: its rule lists exactly the instances Service says are steerable."""

    half_open_timeout = float(SYN_TIMEOUT)

    def __init__(self, network: HostNetwork, config: ServiceConfig) -> None:
        self.network = network
        self.config = config
        self.failed = False  # the last change did not reach the kernel (logged once until one does)
        self.failures = 0
        self._pending: Future[None] | None = None  # the last change handed to the background thread

    def set(self, instances: list[Instance], *, background: bool = False) -> None:
        """background: the change may reach the kernel a moment later, off the event loop (an instance added:
        until then the activator's listener serves what it would get, so the connection that waits for the new
        instance is not held up by the ~1.5 ms of a rule change). Otherwise it is made before this returns, after
        any background change still under way: an instance taken out is out before it is released."""
        if background:
            self._pending = _BACKGROUND.submit(self._apply, list(instances))
            return
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # never raises: _apply keeps its errors
        self._apply(instances)

    def _apply(self, instances: list[Instance]) -> None:
        """Least loaded first: the rule's round robin starts over at its first backend whenever it is rebuilt
        (an instance came or went), so that one must be the one with the fewest connections, not whichever was
        first before. A failure never reaches the caller (a service's state machine, a shutdown): the service
        stays on the activator's own listener for whatever the kernel no longer steers, the network is marked
        for repair, and the next check puts back what is asked here."""
        ordered = sorted(instances, key=lambda i: i.connections)
        backends = [Backend(att.ip, self.config.port, att.mark) for i in ordered
                    if (att := i.sandbox.attachment) is not None]
        try:
            self.network.steer(self.config.name, self.config.listen, backends)
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
