"""Listeners: everything the daemon accepts on (a service's TCP, handoff and UDP sockets, the control socket, the
metrics endpoint, the agent) behind one contract, as aiohttp's AppRunner/Site: started once, stopped once.

stop() stops accepting at once and releases what start() took; it is safe on a listener never started, started
half-way (its start raised) or stopped already, so the one who undoes a partial start-up need not know how far it
got. There is no drain(): connections outlive their listener (a reload's kept socket hands them to the service's
new definition, a removed service's drain on their own), so shutdown drains the connections themselves
(Fleet.drained), not listeners.
"""

from __future__ import annotations

import contextlib
import socket
from collections.abc import Awaitable, Callable
from typing import Protocol

#: runs one undo step and reports its failure rather than raising it (the next step must still run)
Guard = Callable[[str, Callable[[], Awaitable[None]]], Awaitable[None]]


class Listener(Protocol):
    @property
    def name(self) -> str:
        """What and where, for logs and status: 'web TCP listener 127.0.0.1:8080', 'control socket /var/lib/...'."""
        ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...


class ServiceListener(Listener, Protocol):
    """One of a service's listening sockets and what accepts on it (servicelisteners.py)."""

    @property
    def sock(self) -> socket.socket: ...


async def start(stack: contextlib.AsyncExitStack, listener: Listener, guard: Guard) -> None:
    """Start listener with its stop on the stack, pushed first: a start that fails half-way is undone too."""
    stack.push_async_callback(guard, f"stopping the {listener.name}", listener.stop)
    await listener.start()
