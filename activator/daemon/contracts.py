"""What a service drives, as interfaces: its kernel path's steering, its instances' sandboxes, the launcher that
brings instances up. The real ones live in net/, daemon/handoff.py, runtime/ and checkpoints/; the unit tests'
fakes are checked against these by mypy."""

from __future__ import annotations

import socket
from typing import Any, Protocol

from activator.checkpoints.instance import Instance
from activator.checkpoints.store import Checkpoint
from activator.net.network import Attachment
from activator.runtime.readiness import Connect


class Steering(Protocol):
    """A service's kernel path (network.ServiceSteering: a DNAT rule; handoff.HandoffSteering: the apps accept from
    the service's socket): which instances the kernel sends new connections to."""

    #: how long a half-open kernel-path connection lives (a spoofed SYN's entry goes after this)
    half_open_timeout: float
    #: handoff (handoff.py): the service socket's address, where a held connection reaches an app; else None
    address: tuple[str, int] | None

    def set(self, instances: list[Instance], starting: int = 0) -> None: ...

    def open_count(self, inst: Instance) -> tuple[int, int]: ...  # blocking: (open, half-open) from conntrack


class ServiceSandbox(Protocol):
    """What a service (and its steering) uses of an instance's sandbox (runtime.sandbox.Sandbox is one; the unit
    tests' fake is checked against this by mypy)."""

    @property
    def name(self) -> str: ...

    @property
    def attachment(self) -> Attachment | None: ...

    def pid_now(self) -> int | None: ...

    async def stop(self, sig: int, grace: float) -> str: ...

    @property
    def frozen(self) -> bool: ...

    async def freeze(self) -> None: ...

    def thaw(self) -> None: ...

    def socket_inodes(self) -> set[int]: ...  # blocking

    def cpu_seconds(self) -> float | None: ...  # CPU its processes used (None: no cgroup to ask)

    def connector(self, port: int) -> Connect: ...  # connections to the app inside its network namespace

    async def release(self) -> None: ...


class Launcher(Protocol):
    """What a service needs to bring up instances (checkpoints.instance.InstanceLauncher is one; unit tests pass
    a fake that mypy checks against this)."""

    async def restore(self, checkpoint: Checkpoint) -> Instance: ...

    async def cold_start(self, checkpoint: Checkpoint) -> Instance: ...

    #: instances restored ahead and frozen (restore() thaws one of these first), and how many are kept
    standbys: list[Instance]
    standby: int
    #: handoff: the service's listening socket, put into each restored app (None: the app listens on its own)
    listener: socket.socket | None

    def refill(self, checkpoint: Checkpoint) -> None: ...  # prepare standbys and slots for it

    async def set_standby(self, n: int, checkpoint: Checkpoint | None) -> None: ...

    async def drop_slots_except(self, checkpoint: Checkpoint) -> None: ...

    async def reshare(self, ksm: Any) -> None: ...  # share memory (a ksm.Ksm) or not (None) from now on

    async def rehand(self, listener: socket.socket | None) -> None: ...  # handoff: restores get this socket now

    async def close(self) -> None: ...
