"""The pool's decisions as plain functions (core/pool.py): which instance a connection gets, and a stateful
checkpoint's single use. The same decisions carried out with fakes: test_service.py; for real:
tests/engine/test_scale_out.py, test_stateful.py."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from activator.core.pool import Pick, SingleUse, choose


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


def test_a_stateful_checkpoint_is_used_once_and_refreshed_once_nothing_runs_from_it() -> None:
    use: SingleUse[str] = SingleUse(stateful=True)
    assert use.consume("ck1") and use.consumed == "ck1"
    assert not use.consume("ck1")  # a second start does not use it up again: it waits
    assert not use.refresh_due(running=False, closed=False)  # its start is still under way
    use.consuming = False
    assert not use.refresh_due(running=True, closed=False)  # its instance runs (or is being released)
    assert not use.refresh_due(running=False, closed=True)  # shutting down: nothing to make again
    assert use.refresh_due(running=False, closed=False) and use.consumed is None
    assert not use.refresh_due(running=False, closed=False)  # asked for once
    assert use.consume("ck2")


def test_a_checkpoint_that_is_not_stateful_is_never_used_up() -> None:
    use: SingleUse[str] = SingleUse(stateful=False)
    assert not use.consume("ck") and use.consumed is None
    assert not use.refresh_due(running=False, closed=False)
