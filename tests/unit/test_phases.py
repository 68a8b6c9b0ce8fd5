"""A connection's phases as a playbook: given these events at these times, these actions (core/phases.py; no
sockets, no clock). The real connection path under load is tests/engine/test_splice.py and friends."""

from __future__ import annotations

from typing import Any

import pytest

from activator.core.phases import (
    Arm,
    ArmSilent,
    Close,
    ConnectionPhases,
    KeepReading,
    Phase,
    Timeouts,
    Wake,
    Why,
)

DATA = Timeouts(wake_on_connect=False, wake_grace=0.5, idle=None, silent=60.0)


def play(timeouts: Timeouts, steps: list[tuple[float, str, dict[str, Any], list[Any]]]) -> ConnectionPhases:
    """Each step: at time t, event name with its arguments -> the actions expected, in order."""
    c = ConnectionPhases(timeouts, 0.0)
    for t, event, kwargs, expected in steps:
        method = getattr(c, event)
        got = method(t, **kwargs) if event in ("admitted", "client_data", "backend_data", "timer", "spliced") \
            else method(**kwargs)
        assert got == expected, (t, event, got)
    return c


def test_the_first_byte_wakes_a_held_connection() -> None:
    c = play(DATA, [
        (0.0, "admitted", {"needs_wake": True}, [ArmSilent(60.0), KeepReading(), Arm(0.5)]),
        (0.1, "client_data", {}, [ArmSilent(None), Arm(None), Wake()]),
        (0.3, "spliced", {}, []),
    ])
    assert c.phase is Phase.SPLICED


def test_wake_grace_of_silence_wakes_a_server_speaks_first_client() -> None:
    c = play(DATA, [
        (0.0, "admitted", {"needs_wake": True}, [ArmSilent(60.0), KeepReading(), Arm(0.5)]),
        (0.5, "timer", {}, [Arm(None), Wake()]),
        (0.6, "client_data", {}, [ArmSilent(None)]),  # already waking: the byte is held, nothing more
    ])
    assert c.phase is Phase.WAKING


def test_a_scan_wakes_nothing_and_is_counted_as_ignored() -> None:
    c = play(DATA, [
        (0.0, "admitted", {"needs_wake": True}, [ArmSilent(60.0), KeepReading(), Arm(0.5)]),
        (0.1, "client_gone", {"holding_bytes": False}, [Arm(None), ArmSilent(None), Close(Why.IGNORED)]),
        (0.5, "timer", {}, []),  # a timer that fires late finds it closed
    ])
    assert c.phase is Phase.CLOSED


def test_a_client_that_sends_then_closes_is_still_served() -> None:
    """Send-and-close clients: the held bytes and the EOF go to the app at the splice (the race that lost
    requests)."""
    c = play(DATA, [
        (0.0, "admitted", {"needs_wake": True}, [ArmSilent(60.0), KeepReading(), Arm(0.5)]),
        (0.0, "client_data", {}, [ArmSilent(None), Arm(None), Wake()]),
        (0.0, "client_gone", {"holding_bytes": True}, []),
        (0.2, "spliced", {}, []),
    ])
    assert c.phase is Phase.SPLICED


@pytest.mark.parametrize("timeouts", [
    Timeouts(wake_on_connect=True, wake_grace=0.5, idle=None, silent=None),  # wake_on: connect
    Timeouts(wake_on_connect=False, wake_grace=0.5, idle=None, silent=None),  # an instance is ready anyway
])
def test_no_hold_when_connect_wakes_or_an_instance_is_ready(timeouts: Timeouts) -> None:
    needs = timeouts.wake_on_connect
    play(timeouts, [(0.0, "admitted", {"needs_wake": needs}, [Arm(None), Wake()])])


def test_idle_both_ways_closes_a_spliced_connection_and_activity_postpones_it() -> None:
    t = Timeouts(wake_on_connect=True, wake_grace=None, idle=10.0, silent=None)
    c = play(t, [
        (0.0, "admitted", {"needs_wake": True}, [Arm(None), Wake()]),
        (1.0, "timer", {}, []),  # waking: never closed for idling
        (2.0, "spliced", {}, [Arm(10.0)]),
        (5.0, "backend_data", {}, []),
        (12.0, "timer", {}, [Arm(3.0)]),  # the app spoke at 5: 3 s left
        (15.0, "timer", {}, [Arm(None), ArmSilent(None), Close(Why.IDLE)]),
    ])
    assert c.phase is Phase.CLOSED


def test_held_without_wake_grace_idles_out() -> None:
    t = Timeouts(wake_on_connect=False, wake_grace=None, idle=5.0, silent=None)
    play(t, [
        (0.0, "admitted", {"needs_wake": True}, [KeepReading(), Arm(5.0)]),
        (5.0, "timer", {}, [Arm(None), ArmSilent(None), Close(Why.IDLE)]),
    ])


def test_a_client_that_never_speaks_is_closed_as_silent_one_that_spoke_is_not() -> None:
    t = Timeouts(wake_on_connect=True, wake_grace=None, idle=None, silent=60.0)
    never = ConnectionPhases(t, 0.0)
    assert never.admitted(0.0, needs_wake=False) == [ArmSilent(60.0), Arm(None), Wake()]
    assert never.spliced(0.1) == []
    assert never.silent() == [Arm(None), ArmSilent(None), Close(Why.SILENT)]
    spoke = ConnectionPhases(t, 0.0)
    spoke.admitted(0.0, needs_wake=False)
    assert spoke.client_data(1.0) == [ArmSilent(None)]
    assert spoke.silent() == []  # a quiet session that has begun is a feature


def test_closed_elsewhere_takes_no_more_actions() -> None:
    c = ConnectionPhases(DATA, 0.0)
    c.admitted(0.0, needs_wake=True)
    c.closed()
    assert c.timer(0.5) == [] and c.silent() == [] and c.spliced(0.6) == []
