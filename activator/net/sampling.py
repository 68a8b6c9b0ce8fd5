"""What the kernel path has done, per instance and per service: open connections (conntrack, by mark) and the
tables' counters (packets and bytes per instance mark; rejections, steered connections and dropped UDP replies
per service). Read four times a second, so the conntrack side is filtered in the kernel (conntrack.py)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from . import conntrack
from .marks import COUNTED, EGRESS, MARK_MASK, NOT_COUNTED

#: conntrack TCP states of a connection in use (ESTABLISHED .. LAST_ACK); TIME_WAIT/CLOSE are over
OPEN_TCP_STATES = frozenset({3, 4, 5, 6})
#: a handshake not finished (SYN_SENT, SYN_RECV, SYN_SENT2): not yet a connection, maybe a spoofed SYN
HALF_OPEN_TCP_STATES = frozenset({1, 2, 9})


@dataclass
class Sample:
    """One instance's kernel path, as of the last look: open connections and traffic counters."""

    open: int = 0
    packets: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    served: int = 0  # connections it has served on the kernel path (handshake done), since its counters began


@dataclass
class Samples:
    by_mark: dict[int, Sample]
    rejected: dict[str, int]  # connections refused for max_connections, by service
    steered: dict[str, int]  # new connections sent to an instance, by service
    amplified: dict[str, int] = field(default_factory=dict)  # UDP replies dropped over udp_reply_ratio, by service


def fold(counters: Iterable[Mapping[str, Any]], open_by_mark: Mapping[int, tuple[int, int]]) -> Samples:
    """The table's counters (`list counters` as JSON) and connections()' counts as one Samples."""
    out: dict[int, Sample] = {}
    rejected: dict[str, int] = {}
    steered: dict[str, int] = {}
    amplified: dict[str, int] = {}
    for item in counters:
        c = item.get("counter")
        if not c:
            continue
        name = str(c["name"])
        if name.startswith("rejected_"):
            rejected[name.removeprefix("rejected_")] = int(c["packets"])
        elif name.startswith("steered_"):
            steered[name.removeprefix("steered_")] = int(c["packets"])
        elif name.startswith("amplified_"):
            amplified[name.removeprefix("amplified_")] = int(c["packets"])
        elif name.startswith(("in_", "out_", "conns_")):
            mark = int(name.split("_", 1)[1], 16)
            s = out.setdefault(mark, Sample())
            if name.startswith("conns_"):
                s.served = int(c["packets"])
                continue
            s.packets += int(c["packets"])
            if name.startswith("in_"):
                s.bytes_in = int(c["bytes"])
            else:
                s.bytes_out = int(c["bytes"])
    for mark, (n, _half) in open_by_mark.items():
        out.setdefault(mark, Sample()).open = n
    return Samples(out, rejected, steered, amplified)


def connections(base: int) -> dict[int, tuple[int, int]]:
    """One daemon's kernel-path connections per instance mark: (open, half-open); egress ones are not counted.
    Read with conntrack.py (kernel-side mark filter, two attributes decoded): ~10 us an entry."""
    counts: dict[int, tuple[int, int]] = {}
    for raw_mark, state in conntrack.dump(base, MARK_MASK | EGRESS):
        mark = raw_mark & NOT_COUNTED
        n, half = counts.get(mark, (0, 0))
        # state None: a UDP flow, counted once the app has answered it (rules.acct_rules sets COUNTED then)
        if state in OPEN_TCP_STATES or (state is None and raw_mark & COUNTED):
            counts[mark] = (n + 1, half)
        elif state in HALF_OPEN_TCP_STATES:
            counts[mark] = (n, half + 1)
    return counts
