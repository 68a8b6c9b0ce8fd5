"""The pool's decisions as plain functions (core/pool.py): which instance a connection gets, and what becomes of
an idle instance, given the state and a time. The same decisions carried out with fakes: test_service.py; for
real: tests/engine/test_scale_out.py, test_kernel_path.py."""

from __future__ import annotations

from dataclasses import dataclass, replace

import pytest

from activator.core.pool import Idle, IdleVerdict, InstanceView, Pick, choose, idle_check, retired


@dataclass
class Inst:
    connections: int


def test_a_connection_takes_the_least_loaded_instance_with_room() -> None:
    a, b = Inst(3), Inst(1)
    assert choose([a, b], target=2, starting=0) == (Pick.TAKE, b)


@pytest.mark.parametrize(("instances", "starting", "expected"), [
    ([Inst(2), Inst(5)], 0, Pick.OVERFLOW),  # all at target, nothing coming (max_instances): over target
    ([Inst(2)], 1, Pick.WAIT),  # one more is starting: wait for it
    ([], 1, Pick.WAIT),  # the first restore
    ([], 0, Pick.REFUSE),  # nothing runs, nothing starts (backoff, no checkpoint)
])
def test_when_every_instance_is_at_target(instances: list[Inst], starting: int, expected: Pick) -> None:
    pick, got = choose(instances, target=2, starting=starting)
    assert pick is expected
    assert (got is None) == (expected in (Pick.WAIT, Pick.REFUSE))


IDLE = InstanceView(stopping=False, spliced=0, withdrawn=False, kernel=0, idle_since=100.0, steerable=True)


def check(inst: InstanceView = IDLE, *, now: float = 400.0, instances: int = 2, min_instances: int = 0,
          held_by: tuple[str, ...] = (), steered: bool = True, cpu_below: float | None = None) -> IdleVerdict:
    return idle_check(inst, now=now, idle_timeout=300.0, instances=instances, min_instances=min_instances,
                      held_by=held_by, steered=steered, cpu_below=cpu_below)


def test_idle_playbook() -> None:
    # not idle long enough yet: look again when it will be
    assert check(now=250.0) == IdleVerdict(Idle.REARM, 150.0)
    # idle for idle_timeout, on the kernel path: out of the rule first, then counted
    assert check() == IdleVerdict(Idle.RETIRE)
    # the userspace path (or an instance without an address): reaped at once
    assert check(steered=False) == IdleVerdict(Idle.REAP)
    assert check(replace(IDLE, steerable=False)) == IdleVerdict(Idle.REAP)
    # kernel connections seen in the last sample: busy as of now
    assert check(replace(IDLE, kernel=3)) == IdleVerdict(Idle.REARM, 300.0, 400.0)
    # busy on the userspace path, stopping, or already being retired: an event re-arms it
    for busy in (replace(IDLE, spliced=1), replace(IDLE, stopping=True), replace(IDLE, withdrawn=True)):
        assert check(busy) == IdleVerdict(Idle.WAIT_FOR_EVENTS)


def test_an_app_busy_by_cpu_is_not_idle() -> None:
    """idle_cpu_below: at or above the share, a whole quiet window more from now; below it, or unknown (no
    cgroup), connections alone decide; and it never makes a not-yet-idle instance go sooner."""
    busy = replace(IDLE, cpu_share=0.05)
    assert check(busy, cpu_below=0.05) == IdleVerdict(Idle.BUSY_CPU, 300.0, 400.0)
    assert check(busy, cpu_below=0.06) == IdleVerdict(Idle.RETIRE)
    assert check(replace(IDLE, cpu_share=None), cpu_below=0.01) == IdleVerdict(Idle.RETIRE)
    assert check(busy) == IdleVerdict(Idle.RETIRE)  # no policy
    assert check(busy, now=250.0, cpu_below=0.01) == IdleVerdict(Idle.REARM, 150.0)


def test_kept_warm_and_kept_for_a_dependant() -> None:
    assert check(instances=1, min_instances=1) == IdleVerdict(Idle.KEPT_WARM, 300.0)
    # without a kernel path a connection's end re-arms it: no timer needed
    assert check(instances=1, min_instances=1, steered=False) == IdleVerdict(Idle.KEPT_WARM, None)
    # the last instance of a dependency while a dependant has one (depends_on)
    assert check(instances=1, held_by=("web",)) == IdleVerdict(Idle.KEPT_FOR_DEPENDANT, 300.0)
    # a second instance is not needed for the dependant: it goes as usual
    assert check(instances=2, held_by=("web",)) == IdleVerdict(Idle.RETIRE)


@pytest.mark.parametrize(("still_open", "half_open", "spliced", "past", "expected"), [
    (0, 0, 0, False, True),  # nothing got in: reap
    (1, 0, 0, False, False),  # a connection got in before the rule changed: back in the rule
    (0, 0, 1, False, False),  # a userspace connection meanwhile
    (0, 2, 0, False, None),  # handshakes under way: count again
    (0, 2, 0, True, True),  # a spoofed SYN never finishes: reap after the deadline
])
def test_retiring(still_open: int, half_open: int, spliced: int, past: bool, expected: bool | None) -> None:
    assert retired(still_open=still_open, half_open=half_open, spliced=spliced, past_deadline=past) is expected
