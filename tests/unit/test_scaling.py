"""How many instances a service starts and when, as plain functions (core/scaling.py). Carried out with a fake
clock: test_service.py; for real: tests/engine/test_scale_out.py, test_idle_policies.py (min_instances)."""

from __future__ import annotations

import pytest

from activator.core.scaling import (
    Attempt,
    Replenish,
    after_failed_restore,
    first_attempt,
    floor,
    max_instances,
    may_start,
    needs_wake,
    replenish,
    retry_armed,
    scale_out,
)


@pytest.mark.parametrize("blocked", ["closed", "stopped", "backing_off", "checkpoint_problem"])
def test_nothing_starts_for_demand_while_blocked(blocked: str) -> None:
    state = {"closed": False, "stopped": False, "backing_off": False, "checkpoint_problem": False}
    assert may_start(**state)
    assert not may_start(**(state | {blocked: True}))
    assert scale_out(allowed=False, demand=50, ready=0, starting=0, target=1, max_instances=10) == 0


def test_a_burst_starts_what_it_needs_at_once_up_to_max_instances() -> None:
    assert scale_out(allowed=True, demand=1, ready=0, starting=0, target=10, max_instances=4) == 1
    assert scale_out(allowed=True, demand=25, ready=0, starting=0, target=10, max_instances=4) == 3
    assert scale_out(allowed=True, demand=25, ready=1, starting=1, target=10, max_instances=4) == 1
    assert scale_out(allowed=True, demand=500, ready=1, starting=1, target=10, max_instances=4) == 2
    assert scale_out(allowed=True, demand=0, ready=1, starting=0, target=10, max_instances=4) == 0


def test_the_floor_and_a_stateful_checkpoints_single_instance() -> None:
    assert floor(min_instances=0, kept_warm=False) == 0
    assert floor(min_instances=0, kept_warm=True) == 1  # a keep_alive_schedule window
    assert floor(min_instances=3, kept_warm=True) == 3
    assert max_instances(configured=5, stateful=True) == 1
    assert max_instances(configured=5, stateful=False) == 5


def test_replenish_keeps_the_floor_and_waits_out_the_backoff() -> None:
    assert replenish(serving=True, backoff_remaining=0.0, floor=3, ready=1, starting=1) == Replenish(starts=1)
    assert replenish(serving=True, backoff_remaining=0.0, floor=1, ready=2, starting=0) == Replenish()
    assert replenish(serving=True, backoff_remaining=4.5, floor=3, ready=0, starting=0) == Replenish(retry_in=4.5)
    assert replenish(serving=False, backoff_remaining=4.5, floor=3, ready=0, starting=0) == Replenish()


def test_a_failed_start_arms_one_retry_only_for_a_floor() -> None:
    assert retry_armed(floor=1, armed=False, closed=False)
    assert not retry_armed(floor=0, armed=False, closed=False)  # the next connection asks instead
    assert not retry_armed(floor=1, armed=True, closed=False)  # one is enough
    assert not retry_armed(floor=1, armed=False, closed=True)


def test_whether_a_connection_now_would_wake_the_service() -> None:
    assert needs_wake(None, target=5, ready=0, starting=0, max_instances=1)  # nothing runs
    assert not needs_wake(4, target=5, ready=1, starting=0, max_instances=3)  # room on one
    assert needs_wake(5, target=5, ready=1, starting=0, max_instances=3)  # all at target: scale out
    assert not needs_wake(5, target=5, ready=2, starting=1, max_instances=3)  # at max: overflow, no wake


def test_a_start_restores_unless_restores_back_off_then_its_fallback_decides() -> None:
    assert first_attempt(restores_backing_off=False, fallback="none") is Attempt.RESTORE
    assert first_attempt(restores_backing_off=True, fallback="cold-start") is Attempt.COLD_START
    assert first_attempt(restores_backing_off=True, fallback="none") is Attempt.REFUSE
    assert after_failed_restore(fallback="cold-start") is Attempt.COLD_START
    assert after_failed_restore(fallback="none") is Attempt.REFUSE
