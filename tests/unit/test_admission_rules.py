"""Admission's refusals and the rejection tally as plain logic (core/admission.py), time passed in. Carried out
with a fake clock: test_service.py; for real, with clients: tests/engine/test_admission.py."""

from __future__ import annotations

from activator.core.admission import (
    REJECT_LOG_INTERVAL,
    RejectionTally,
    backoff_seconds,
    no_instance,
    queue_full,
    refusal,
)


def test_refusals_in_order_of_precedence() -> None:
    def why(**kw: object) -> str | None:
        state: dict[str, object] = {"closed": False, "stopped": False, "max_connections": 2, "open_connections": 1}
        r = refusal("web", **(state | kw))  # type: ignore[arg-type]
        return None if r is None else r.reason
    assert why() is None
    assert why(open_connections=2) == "max-connections"
    assert why(max_connections=None, open_connections=10**6) is None  # no limit
    assert why(stopped=True, open_connections=2) == "stopped"
    assert why(closed=True, stopped=True) == "shutting-down"


def test_the_queue_is_bounded() -> None:
    assert queue_full("web", waiting=4, max_waiting=5) is None
    full = queue_full("web", waiting=5, max_waiting=5)
    assert full is not None and full.reason == "queue-full" and "5 connections waiting" in str(full)


def test_no_instance_says_why_and_when_to_try_again() -> None:
    build = no_instance("web", checkpoint_problem="image 'x' is missing", has_checkpoint=False, retry_at=130.0,
                        backoff_until=0.0, now=100.0)
    assert build.reason == "no-checkpoint" and build.retry_after == 30.0 and "image 'x' is missing" in str(build)
    starts = no_instance("web", checkpoint_problem=None, has_checkpoint=True, retry_at=0.0, backoff_until=104.0,
                         now=100.0)
    assert starts.reason == "backoff" and starts.retry_after == 4.0
    late = no_instance("web", checkpoint_problem=None, has_checkpoint=True, retry_at=0.0, backoff_until=90.0,
                       now=100.0)
    assert late.retry_after == 0.0  # never negative
    # the backoff gauge: the longer of the two waits
    assert backoff_seconds(checkpoint_problem=True, retry_at=130.0, backoff_until=104.0, now=100.0) == 30.0
    assert backoff_seconds(checkpoint_problem=False, retry_at=130.0, backoff_until=104.0, now=100.0) == 4.0
    assert backoff_seconds(checkpoint_problem=False, retry_at=0.0, backoff_until=50.0, now=100.0) == 0.0


def test_the_tally_logs_at_once_then_at_most_once_per_interval_and_loses_nothing() -> None:
    tally = RejectionTally()
    assert tally.add("queue-full", 1, "first", now=100.0) == 0  # never logged: at once
    assert tally.line(100.0) == "1 queue-full (latest: first)"
    assert tally.line(100.0) is None  # nothing new
    assert tally.add("queue-full", 1, "a", now=101.0) == REJECT_LOG_INTERVAL - 1  # arm a timer for the rest
    assert tally.add("max-connections", 3, "b", now=102.0) == REJECT_LOG_INTERVAL - 2
    assert tally.line(100.0 + REJECT_LOG_INTERVAL) == "3 max-connections, 1 queue-full (latest: b)"
    assert tally.add("queue-full", 1, "c", now=100.0 + 2 * REJECT_LOG_INTERVAL) == 0
