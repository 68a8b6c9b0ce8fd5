"""What this host tells an L4 balancer about one service: HAProxy's agent-check answer, decided.

The balancer (config/haproxy/haproxy.cfg) asks every host's agent for the service's state and weight, and spreads
new connections over the hosts by those weights. The answer is a plain function of the service's pool as the
daemon last saw it; daemon/agent.py only reads that state and writes the line.

    drain             the daemon is shutting down (or the service is stopped): send nobody new, let the open
                      connections finish (HAProxy's DRAIN state, weight 0)
    down #why         the service cannot start an instance here (no checkpoint, backing off after failed starts)
    up ready W%       it serves; W says how much it is worth sending here:
                        WARM  a ready instance is below target_connections: a client is served at once
                        COLD  no room on a ready instance, but one more can be restored (below max_instances)
                        FULL  every instance is at target and no more may start: clients queue or overflow

`ready` is always sent with `up`: a host that said `drain` before (a reload, `activator stop`) comes back by it.
Weights are percentages of the server's configured weight: a host with a warm instance gets WARM/COLD times the
new connections of a cold one, so warm capacity is used first without starving a cold host of its first client.
"""

from __future__ import annotations

from dataclasses import dataclass

WARM, COLD, FULL = 100, 30, 5


@dataclass(frozen=True)
class PoolState:
    """One service as the agent reads it."""

    stopping: bool  # the daemon is draining (SIGTERM) or the service is stopped / being replaced
    serving: bool  # it has a checkpoint and is not backing off: an instance can be had
    problem: str  # why not, when not serving
    ready_instances: int
    connections: int  # open connections on the ready instances (both paths)
    starting: int
    target: int  # target_connections
    max_instances: int


def reply(state: PoolState | None, name: str = "") -> str:
    """The agent's one line (without the newline) for a service, or for a name this daemon does not serve."""
    if state is None:
        return f"down #no service '{_safe(name)}' here"
    if state.stopping:
        return "drain"
    if not state.serving:
        return f"down #{_safe(state.problem)}"
    return f"up ready {weight(state)}%"


def weight(state: PoolState) -> int:
    if state.connections < state.ready_instances * state.target:
        return WARM
    if state.ready_instances + state.starting < state.max_instances:
        return COLD
    return FULL


def _safe(text: str) -> str:
    """A description HAProxy logs: printable ASCII on one line, bounded."""
    return "".join(c if 32 <= ord(c) < 127 else "?" for c in text)[:120]
