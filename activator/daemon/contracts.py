"""What a service drives, as interfaces: its instances' sandboxes and the launcher that brings instances up (its
steering mode's interface is steering.Mode). The real ones live in runtime/ and checkpoints/; the unit tests'
fakes are checked against these by mypy."""

from __future__ import annotations

import socket
from typing import Any, Protocol

from activator.checkpoints.instance import Instance
from activator.checkpoints.store import Checkpoint
from activator.net.network import Attachment
from activator.runtime.readiness import Connect


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
