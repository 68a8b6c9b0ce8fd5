"""One client connection's claim on its service (daemon/service.py admits it and hands it out): the instance it
was given, counted in and out exactly once."""

from __future__ import annotations

import asyncio
from typing import Protocol

from activator.checkpoints.instance import Instance


class Leasing(Protocol):
    """What a lease asks of its service (service.Service)."""

    async def acquire_instance(self) -> tuple[Instance, bool]: ...

    def release_instance(self, inst: Instance) -> None: ...

    def take(self, inst: Instance) -> None: ...

    def proved(self, inst: Instance) -> None: ...

    def instance_failed(self, inst: Instance, why: str) -> None: ...

    def connection_closed(self) -> None: ...


class Lease:
    """One client connection's claim on its service, from admission until release(), which counts it out
    exactly once (and the instance it was given, if any)."""

    __slots__ = ("instance", "released", "service")

    def __init__(self, service: Leasing) -> None:
        self.service = service
        self.instance: Instance | None = None
        self.released = False

    async def acquire(self) -> tuple[Instance, bool]:
        """A ready instance for this connection; waited=True if a start was awaited. Raises Rejected."""
        self.drop()
        inst, waited = await self.service.acquire_instance()
        if self.released:  # the client left while we waited
            self.service.release_instance(inst)
            raise asyncio.CancelledError
        self.instance = inst
        return inst, waited

    def claim(self, inst: Instance) -> bool:
        """Count this connection on an instance it already reaches (a UDP flow its app has just answered); False
        if that instance is going away."""
        self.drop()
        if inst.track.stopping or self.released:
            return False
        self.service.take(inst)
        self.instance = inst
        return True

    def connected(self) -> None:
        """The app accepted this connection."""
        assert self.instance is not None
        if not self.instance.track.established:
            self.service.proved(self.instance)
        self.instance.track.established += 1

    def broken(self, why: str) -> bool:
        """The instance refused this connection past its deadline: it is removed. True if the connection
        should try another instance (this one had worked before: its app died), False if the start itself
        never worked (the service backs off)."""
        inst = self.instance
        assert inst is not None
        self.drop()
        self.service.instance_failed(inst, why)
        return inst.track.established > 0

    def drop(self) -> None:
        """Give the instance back without blaming it (the connection failed on our side)."""
        if self.instance is not None:
            inst, self.instance = self.instance, None
            self.service.release_instance(inst)

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.drop()
        self.service.connection_closed()
