"""A service's HTTP probes, answered by the activator on the app's behalf.

core/probes.py decides what a probe is and renders the answer; here it is found: from a running instance, asked on
the activator's own connection, else the answer recorded in the checkpoint, else 503. A probe is never spliced: it
must not reach an instance as a client's connection, nor keep one alive."""

from __future__ import annotations

import ipaddress

from activator.core import capacity, probes
from activator.runtime import readiness

from .service import Service


def answerable(svc: Service, source: ipaddress.IPv4Address | ipaddress.IPv6Address, held: bytes
               ) -> tuple[str, bool] | None:
    """(target, head_only) if the held request is one of the service's HTTP probes from its prober and the
    activator can answer it; None: served as any connection (not a probe, or a checkpoint made before this
    probe, whose app answers it itself and wakes)."""
    asked = probes.request(held)
    if asked is None:
        return None
    method, target = asked
    if probes.http_probe(svc.config.probes, source, target) is None:
        return None
    ck = svc.checkpoint
    if not svc.instances and svc.unhealthy() is None and (ck is None or ck.probe_answer(target) is None):
        return None
    return target, method == "HEAD"


async def answer(svc: Service, target: str, *, head_only: bool) -> bytes:
    """The probe's answer as the client gets it, counted by where it came from."""
    answer, how = probes.UNAVAILABLE, "unavailable"
    if svc.unhealthy() is None:
        inst = capacity.least_loaded(svc.instances)
        if inst is not None:  # ask it ourselves: the real app's health, on a connection that is not a client's
            raw = await readiness.http_fetch(inst.sandbox.connector(svc.config.port), svc.config.port, target,
                                             probes.ANSWER_LIMIT)
            answer, how = (parsed, "live") if raw is not None and (parsed := probes.parse_answer(raw)) else \
                (probes.UNAVAILABLE, "unavailable")
        elif svc.checkpoint is not None and (recorded := svc.checkpoint.probe_answer(target)) is not None:
            answer, how = recorded, "recorded"
    svc.m.probes[f"http/{how}"].inc()
    return probes.render(answer, head_only=head_only)
