"""The registry of steering modes (steering.py): which one a service gets, and how it is made.

Tried in order, the first that applies wins: handoff when the service asks for it and has its one socket to hand
(Fleet._handoff_listener logs why not otherwise), the kernel path when the host network can reach the instances and
the checkpoint's app listens where the bridge reaches it, else userspace, which always can.
"""

from __future__ import annotations

import socket
from collections.abc import Callable
from dataclasses import dataclass

from activator.checkpoints.store import Checkpoint
from activator.config.service import ServiceConfig
from activator.net.network import HostNetwork, kernel_path_possible

from .handoff import HandoffMode
from .kernelmode import KernelMode
from .metrics import Metrics
from .steering import Mode
from .userspace import UserspaceMode


@dataclass(frozen=True)
class ModeContext:
    """Everything a mode may be made from (each takes what it needs)."""

    config: ServiceConfig
    checkpoint: Checkpoint
    network: HostNetwork | None
    #: the service's one listening socket, when it asks for handoff and the host can restore with it
    handoff_socket: socket.socket | None
    metrics: Metrics
    accepting: Callable[[bool], None]  # handoff: the activator accepts on the socket, or not
    replace_socket: Callable[[str], None]  # handoff: an app left the socket deaf for good (why): replace it
    listening_again: Callable[[], None]  # handoff: the socket was made to listen again


@dataclass(frozen=True)
class Entry:
    name: str
    applies: Callable[[ModeContext], bool]
    make: Callable[[ModeContext], Mode]


def _handoff(c: ModeContext) -> Mode:
    assert c.handoff_socket is not None
    return HandoffMode(c.config, c.handoff_socket, c.accepting, c.metrics, c.replace_socket, c.listening_again)


def _kernel(c: ModeContext) -> Mode:
    assert c.network is not None
    return KernelMode(c.network, c.config)


MODES: tuple[Entry, ...] = (
    Entry("handoff", lambda c: c.handoff_socket is not None, _handoff),
    Entry("kernel", lambda c: c.network is not None and kernel_path_possible(c.config) and c.checkpoint.kernel_path,
          _kernel),
    Entry("userspace", lambda c: True, lambda c: UserspaceMode()),
)


def choose(context: ModeContext) -> Entry:
    return next(entry for entry in MODES if entry.applies(context))
