"""The activation path TCP connections (proxy.py) and UDP flows (udp.py) share.

The client waits while its side reaches the app (an instance acquired, started if need be, and a socket into it);
every way that can end is decided here once, the same for both:

  refused    admission control said no (Rejected: queue-full past max_waiting, backoff after failed starts,
             no-checkpoint, shutting-down, stopped, max-connections, resources): counted by reason in
             activator_rejected_connections_total and logged in the service's tally (service.reject: at most one
             line per interval), and the client is turned away with the reason (a TCP client as its service's
             `refusal` says; a flow simply ends).
  failed     anything else (a start that never worked, an app that refused past connect_timeout): counted in
             activator_connection_errors_total, one warning line naming the service and the client, and the
             client is turned away without a reason.
  cancelled  the client went first (its connection was closed, the flow evicted): the client is closed, nothing
             is counted, the cancellation goes on.
  left       reached, but the client went while the last step was under way: what was reached is closed at once
             (a backend must not outlive its client).
  reached    the wait is observed in activator_first_connection_wait_seconds when a start was awaited.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol, TypeVar

from activator.errors import Rejected

#: errors that mean the activator itself is out of something, not that the app refused
RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class Closing(Protocol):
    def close(self) -> None: ...


class Activated(Protocol):
    """What the path asks of the service (service.Service)."""

    @property
    def name(self) -> str: ...

    @property
    def m(self) -> Any: ...  # metrics.ServiceMetrics: connection_errors, first_connection_wait

    def reject(self, why: Rejected) -> None: ...


class Waiting(Protocol):
    """The client the app is reached for (proxy.Connection, udp.Flow)."""

    @property
    def closed(self) -> bool: ...

    def turned_away(self, why: Rejected | None) -> None:
        """Not served: why, if admission control said so (None: it failed). Ends the client."""

    def close(self) -> None: ...


Reached = TypeVar("Reached", bound=Closing)


def short_of(e: OSError, what: str) -> Rejected | None:
    """The activator's own exhaustion (EMFILE and friends) as the refusal `resources`, which never counts
    against the instance; None for any other error."""
    return Rejected("resources", f"{what}: {e.strerror}") if e.errno in RESOURCE_ERRNOS else None


async def activate(svc: Activated, client: Waiting, reach: Callable[[], Awaitable[tuple[Reached, bool]]], *,
                   what: str, since: float, log: logging.Logger) -> Reached | None:
    """What reach() reached (it returns that and whether a start was awaited), or None: the client was turned
    away, or left meanwhile. `what` names the client in the log line; `since` is when it began waiting."""
    try:
        reached, waited = await reach()
    except asyncio.CancelledError:
        client.close()
        raise
    except Rejected as e:
        svc.reject(e)
        client.turned_away(e)
        return None
    except Exception as e:
        svc.m.connection_errors.inc()
        log.warning("service=%s %s could not be served: %s", svc.name, what, e)
        client.turned_away(None)
        return None
    if client.closed:
        reached.close()
        return None
    if waited:
        svc.m.first_connection_wait.observe(time.monotonic() - since)
    return reached
