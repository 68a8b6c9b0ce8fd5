"""What becomes of an idle instance, as plain functions of its state and a time (core/reaping.py). The same
decisions carried out with a fake clock: test_service.py; for real: tests/engine/test_idle_policies.py,
test_kernel_path.py, test_handoff.py."""

from __future__ import annotations

from dataclasses import replace

import pytest

from activator.core.reaping import (
    Idle,
    IdleVerdict,
    InstanceView,
    Released,
    cpu_share,
    idle_check,
    looked_at_again,
    released,
    retire_deadline,
    retired,
)

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


def test_cpu_share_is_measured_from_the_mark() -> None:
    assert cpu_share((100.0, 2.0), 2.5, 110.0) == pytest.approx(0.05)  # 0.5 s of CPU in 10 s
    assert cpu_share((100.0, 2.0), 1.0, 110.0) == 0.0  # a counter that went back (a new cgroup): not negative
    assert cpu_share(None, 2.5, 110.0) is None  # never marked
    assert cpu_share((100.0, 2.0), None, 110.0) is None  # no cgroup to ask
    assert cpu_share((100.0, 2.0), 3.0, 100.0) is None  # no time has passed


def test_the_last_connection_arms_the_idle_timer_and_room_below_target_wakes_a_waiter() -> None:
    assert released(spliced=0, connections=0, target=1) == Released(arm_idle=True, room=True)
    assert released(spliced=0, connections=3, target=2) == Released(arm_idle=True, room=False)  # kernel ones
    assert released(spliced=2, connections=2, target=3) == Released(arm_idle=False, room=True)
    assert released(spliced=5, connections=5, target=3) == Released(arm_idle=False, room=False)


def test_what_is_looked_at_again_and_the_retire_deadline() -> None:
    assert looked_at_again(spliced=0, stopping=False, withdrawn=False)
    assert not looked_at_again(spliced=1, stopping=False, withdrawn=False)  # its connection's end re-arms it
    assert not looked_at_again(spliced=0, stopping=True, withdrawn=False)
    assert not looked_at_again(spliced=0, stopping=False, withdrawn=True)  # being retired
    assert retire_deadline(100.0, 5.0) == 106.0
