"""The userspace mode (steering.py): every connection reaches the activator's own listener, which splices it to an
instance (proxy.py) or relays its datagrams (udp.py). The activator counts what it handles itself, so the mode
steers nothing and samples nothing. A service is in it when the kernel cannot reach its instances (network: host,
proxy_protocol, IPv6 only, a checkpoint whose app listens on loopback) and until its first checkpoint is in use."""

from __future__ import annotations

from collections.abc import Callable

from activator.checkpoints.instance import Instance
from activator.core.clock import Clock
from activator.net.sampling import Samples

from .steering import EMPTY, Mode, Sample


class UserspaceMode:
    name = "userspace"
    steers = False
    address: tuple[str, int] | None = None
    failures = 0

    def reaches(self, inst: Instance) -> bool:
        return False

    def set(self, instances: list[Instance], starting: int = 0) -> None:
        pass

    async def sample(self, instances: list[Instance], shared: Samples | None, arrived: int) -> Sample:
        return EMPTY

    async def retire(self, inst: Instance, clock: Clock, resteer: Callable[[], None]) -> int:
        return 0  # nothing reaches it but through the activator, which knows what it holds (inst.track.spliced)

    def carry_from(self, previous: Mode) -> None:
        pass  # its counts are the kernel's, cumulative, and the service carries those (Service.totals)

    def guard(self) -> None:
        pass

    def stop(self) -> None:
        pass
