"""`activator top` (status --watch): one frame of the operator's live view, made from two of the daemon's status
answers taken `dt` seconds apart. Rates (starts per second, CPU) are the difference between the two; the first
frame has no earlier answer and shows none."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


def size(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover  (the loop returns at GiB)


def age(seconds: float) -> str:
    s = int(seconds)
    return f"{s}s" if s < 120 else f"{s // 60}m" if s < 7200 else f"{s // 3600}h" if s < 172800 else f"{s // 86400}d"


def _rate(now: float | None, before: float | None, dt: float) -> float | None:
    if now is None or before is None or dt <= 0 or now < before:  # a restarted daemon or a new cgroup: no rate
        return None
    return (now - before) / dt


def _cpu(share: float | None) -> str:
    return "-" if share is None else f"{share * 100:.1f}%"


def frame(cur: Mapping[str, Any], prev: Mapping[str, Any] | None, dt: float, header: str) -> list[str]:
    """The lines of one frame: a header, one line per service (instances, starting, waiting, open connections,
    starts per second, memory and CPU of its instances together), then its instances, busiest first."""
    prev_services = {s["name"]: s for s in (prev or {}).get("services", [])} if prev else {}
    if prev and prev.get("pid") != cur.get("pid"):
        prev_services = {}  # another daemon: its counters started again
    lines = [header, ""]
    lines.append(f"{'SERVICE':<20} {'INST':>7} {'START':>5} {'WAIT':>5} {'CONNS':>6} {'STARTS/S':>8} "
                 f"{'MEMORY':>10} {'CPU':>7}  STATE")
    for svc in cur.get("services", []):
        before = prev_services.get(svc["name"])
        earlier = {i["name"]: i for i in before["instances"]} if before else {}
        instances = []
        for inst in svc["instances"]:
            was = earlier.get(inst["name"])
            share = _rate(inst.get("cpu_seconds"), was.get("cpu_seconds") if was else None, dt)
            instances.append((inst, share))
        memory = sum(i.get("memory_bytes") or 0 for i, _ in instances)
        shares = [s for _, s in instances if s is not None]
        starts = _rate(svc.get("started_total"), before.get("started_total") if before else None, dt)
        state = []
        if svc.get("stopped"):
            state.append("stopped")
        if svc.get("checkpoint_problem"):
            state.append("no checkpoint")
        elif svc.get("checkpoint") is None:
            state.append("building")
        if svc.get("backoff_seconds"):
            state.append(f"backing off {svc['backoff_seconds']:.0f}s")
        if svc.get("standby"):
            state.append(f"standby {len(svc.get('standbys', []))}/{svc['standby']}")
        if svc.get("handoff"):
            state.append("handoff")
        if not svc["instances"] and not svc["starting"] and not state:
            state.append("asleep")
        lines.append(
            f"{svc['name'][:20]:<20} {len(svc['instances']):>3}/{svc['max_instances']:<3} {svc['starting']:>5} "
            f"{svc['waiting']:>5} {svc['open_connections']:>6} "
            f"{'-' if starts is None else f'{starts:.1f}':>8} {size(memory if instances else None):>10} "
            f"{_cpu(sum(shares) if shares else None):>7}  {', '.join(state)}")
        for inst, share in sorted(instances, key=lambda x: -(x[1] or 0)):
            lines.append(f"  {inst['name'][:24]:<24} {inst['how']:<8} {age(inst['age_seconds']):>5} "
                         f"{inst['connections'] + inst.get('kernel_connections', 0):>6} conns "
                         f"{inst['served']:>8} served {size(inst.get('memory_bytes')):>10} {_cpu(share):>7}")
    return lines
