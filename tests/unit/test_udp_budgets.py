"""Pure logic of issue 30 item 6 (UDP as a hostile network sees it): the unanswered-flow budgets, and the kernel
path's reply bound as nftables applies it. The engine tests (tests/engine/test_udp.py) play the attacker."""

from __future__ import annotations

import itertools
import math

import pytest

from activator.daemon import udp
from activator.net.network import AMPLIFY_STEPS


class FakeFlow:
    def __init__(self, table: udp.Unanswered, source: str) -> None:
        self.table, self.source, self.ended = table, source, False

    def end(self, *, evicted: bool = False) -> None:
        self.ended = evicted
        self.table.remove(self)  # type: ignore[arg-type]


def test_a_source_past_its_budget_ends_its_own_oldest_and_nobody_elses(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "SOURCE_FLOWS", 3)
    table = udp.Unanswered()
    real = FakeFlow(table, "192.0.2.1")
    table.add(real)  # type: ignore[arg-type]
    forged = [FakeFlow(table, "198.51.100.7") for _ in range(10)]
    for f in forged:
        table.add(f)  # type: ignore[arg-type]
    assert [f.ended for f in forged] == [True] * 7 + [False] * 3
    assert not real.ended and len(table.flows) == 4


def test_the_service_past_its_budget_ends_its_oldest(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(udp, "SERVICE_FLOWS", 5)
    table = udp.Unanswered()
    flows = [FakeFlow(table, f"198.51.100.{i}") for i in range(8)]
    for f in flows:
        table.add(f)  # type: ignore[arg-type]
    assert [f.ended for f in flows] == [True] * 3 + [False] * 5
    assert len(table.flows) == 5 and set(table.by_source) == {f"198.51.100.{i}" for i in range(3, 8)}


def bound(sent: int, ratio: float) -> int | None:
    """The reply bytes the ladder of rules lets through after a client sent `sent` (None: unbounded)."""
    for low, high in itertools.pairwise(AMPLIFY_STEPS):
        if sent < high:
            return math.floor(ratio * low)
    return None


@pytest.mark.parametrize("ratio", [1.0, 3.0, 10.0])
def test_the_kernel_reply_bound_is_between_ratio_over_sqrt2_and_ratio_times_what_was_sent(ratio: float) -> None:
    for sent in [28, 29, 45, 64, 65, 100, 1000, 1500, 65535, 10**6, 2**31]:
        b = bound(sent, ratio)
        assert b is not None and ratio * sent / math.sqrt(2) - ratio - 1 <= b <= ratio * sent, (sent, b)
    assert bound(2**33, ratio) is None  # past the top: a flow whose client sent 8 GiB itself is not bounded


class EndedFlow:
    def __init__(self, port: int, answered: bool) -> None:
        self.addr = ("198.51.100.7", port)
        self.lease = object() if answered else None


@pytest.mark.asyncio
async def test_ended_flows_queue_bounded_work_on_a_thread_of_their_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """A flood of ended flows (each once a netlink dump of ~10 ms) must not queue unbounded work, nor any on the
    shared thread pool every restore uses: unanswered flows queue nothing, answered ones at most FORGET_QUEUE,
    deleted one at a time on the front's own thread."""
    import threading

    deleted: list[tuple[tuple[str, int], int, str]] = []
    def forget(client: tuple[str, int], port: int) -> int:
        deleted.append((client, port, threading.current_thread().name))
        return 1

    monkeypatch.setattr(udp, "forget_udp_flow", forget)
    front = udp.UdpFront(lambda: None, 5353)  # type: ignore[arg-type,return-value]
    for port in range(10_000):
        front.ended(EndedFlow(port, answered=False))  # type: ignore[arg-type]
    assert not front._to_forget and front._forgetter is None
    for port in range(10_000):
        front.ended(EndedFlow(port, answered=True))  # type: ignore[arg-type]
    assert front._forgetter is not None
    await front._forgetter
    assert udp.FORGET_QUEUE <= len(deleted) < 2 * udp.FORGET_QUEUE
    assert {thread for _, _, thread in deleted} <= {f"udp-forget_{i}" for i in range(1)}
    front.close()
