"""Steering modes: how a service's new connections reach its instances, as one interface.

A service has exactly one mode at a time (Service.mode), chosen by the registry below from its configuration and
its checkpoint when the lifecycle owner hands it a checkpoint (Fleet.use):

- userspace (userspace.py): every connection reaches the activator's own listener, which splices it to an instance
  (TCP) or relays its datagrams (UDP); the activator counts them itself, so the mode has nothing to sample.
- kernel (kernelmode.py): a DNAT rule sends new connections and UDP flows straight to ready instances on the
  bridge; conntrack and the table's counters say how many each has.
- handoff (handoff.py): the restored apps accept from the service's own listening socket; the host's socket table
  says how many each holds, and an input-hook counter how many arrived.

What the service asks of a mode is the Mode protocol: which instances take new connections (set: an instance
joins or leaves), whether an instance is reached by it at all (reaches), what demand it saw since the last look
(sample, folded by Service.fold without knowing the mode), how an idle instance is taken out and counted before
its reap (retire), its upkeep each meter tick (guard), and leaving the service (stop). Adding a mode is a module
with a class that satisfies Mode, an Entry in modes.MODES (with what it is made from: modes.ModeContext, built by
Fleet._mode_context) and its config key; the service's logic and the meter do not branch on the mode.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Protocol

from activator.checkpoints.instance import Instance
from activator.core.clock import Clock
from activator.net.sampling import Samples


@dataclass(frozen=True)
class InstanceSample:
    """One instance, since the mode's last look at it."""

    open: int  # connections open now
    active: bool  # it had traffic (or its open count changed): not idle
    new: int = 0  # connections it took
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass(frozen=True)
class Totals:
    """A service's cumulative counts as the kernel keeps them (they outlive a reload of the service; a table put
    back after a firewall reload starts them again from zero)."""

    connections: int = 0  # new connections the mode gave to instances
    rejected: int = 0  # refused in the kernel for max_connections
    replies_dropped: int = 0  # UDP replies dropped over udp_reply_ratio


@dataclass(frozen=True)
class Sample:
    """What a mode saw of a service's demand since its last look; one type for every mode."""

    instances: Mapping[Instance, InstanceSample] = field(default_factory=dict)
    #: the service's cumulative counts (None: nothing to say, e.g. an old definition whose counters the new one
    #: folds)
    totals: Totals | None = None
    #: connections no instance has taken yet (handoff: the socket's accept queue), counted toward scale-out
    waiting: int = 0
    #: instances the mode no longer reaches, on their own doing (a handoff app that closed the socket it was
    #: handed): the service applies set() again
    left: tuple[Instance, ...] = ()


EMPTY = Sample()


class Mode(Protocol):
    #: "userspace", "kernel" or "handoff": in status and logs
    name: str
    #: the kernel gives new connections to instances (False: every one reaches the activator, which counts it)
    steers: bool
    #: where a connection the activator holds reaches an app (handoff: the service socket's address), else None
    address: tuple[str, int] | None
    #: steering changes the kernel refused since the meter last took them (watchers.keep_network counts them in
    #: activator_kernel_path_failures_total)
    failures: int

    def reaches(self, inst: Instance) -> bool:
        """Does this mode send connections to the instance without the activator?"""
        ...

    def set(self, instances: list[Instance], starting: int) -> None:
        """These instances take new connections (an instance joined or left), `starting` more are on the way."""
        ...

    async def sample(self, instances: list[Instance], shared: Samples | None, arrived: int) -> Sample:
        """The demand since the last look. shared: this tick's host-wide kernel sample (one conntrack dump for all
        services), None without a network; arrived: connections the activator's own listener took for the
        service so far (the handoff counter includes them)."""
        ...

    async def retire(self, inst: Instance, clock: Clock, resteer: Callable[[], None]) -> int:
        """Take an idle instance (already marked withdrawn) out of the mode and count what it still has open:
        0 to reap it, more to put it back. resteer applies set() to the service's instances."""
        ...

    def carry_from(self, previous: Mode) -> None:
        """This mode takes over from `previous` for the same service (a reload's new definition, a replaced
        socket): counts it keeps go on from there."""
        ...

    def guard(self) -> None:
        """Each meter tick, on the loop: put back what the mode relies on (handoff: the shared socket's state)."""
        ...

    def stop(self) -> None:
        """The service leaves this mode (a reload's old definition, a checkpoint without a kernel path): no new
        connection is steered any more; sampling goes on for the instances it has, without the service's
        counters."""
        ...


def counted_since(total: int, last: int) -> int:
    """What a cumulative kernel counter gained since it said `last`; one below that was put back from zero (a
    table repaired after a firewall reload): all of it is new."""
    return total - last if total >= last else total
