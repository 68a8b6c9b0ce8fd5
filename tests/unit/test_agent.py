"""The balancer agent's answers (core/agent.py): what HAProxy hears for each state of a service's pool."""

from __future__ import annotations

from activator.core.agent import COLD, FULL, WARM, PoolState, reply


def pool(**kw: object) -> PoolState:
    base: dict[str, object] = {"stopping": False, "serving": True, "problem": "", "ready_instances": 0,
                               "connections": 0, "starting": 0, "target": 10, "max_instances": 2}
    return PoolState(**(base | kw))  # type: ignore[arg-type]


def test_a_warm_instance_with_room_is_worth_most() -> None:
    assert reply(pool(ready_instances=1, connections=3)) == f"up ready {WARM}%"


def test_cold_but_able_to_restore() -> None:
    assert reply(pool()) == f"up ready {COLD}%"
    assert reply(pool(ready_instances=1, connections=10)) == f"up ready {COLD}%"  # at target, one more may start


def test_full_still_serves_but_is_worth_least() -> None:
    assert reply(pool(ready_instances=2, connections=20)) == f"up ready {FULL}%"
    assert reply(pool(ready_instances=1, starting=1, connections=10)) == f"up ready {FULL}%"
    assert WARM > COLD > FULL > 0


def test_stopping_drains_whatever_else_is_true() -> None:
    assert reply(pool(stopping=True, ready_instances=1)) == "drain"
    assert reply(pool(stopping=True, serving=False, problem="x")) == "drain"


def test_down_says_why_on_one_printable_line() -> None:
    assert reply(pool(serving=False, problem="no checkpoint: build failed\nline2\x1b[31m")) == \
        "down #no checkpoint: build failed?line2?[31m"
    assert reply(None, "nope") == "down #no service 'nope' here"
    assert len(reply(None, "x" * 10_000)) < 200
