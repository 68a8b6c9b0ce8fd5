"""Pure logic of scale-out and backoff, and the capacity keys of the config: no engine."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest

from activator.config.model import Backoff, parse_config
from activator.core.capacity import FailureBackoff, least_loaded, starts_needed
from activator.errors import ConfigError

P = Path("/etc/activator/services.yaml")


@dataclass
class Fake:
    connections: int


def test_least_loaded_picks_fewest_connections() -> None:
    a, b, c = Fake(3), Fake(1), Fake(2)
    assert least_loaded([a, b, c]) is b
    assert least_loaded([]) is None


@pytest.mark.parametrize(
    ("demand", "ready", "starting", "target", "max_instances", "expected"),
    [
        (1, 0, 0, 10, 1, 1),      # first connection: one restore
        (200, 0, 1, 10, 1, 0),    # a burst on a single-instance service: still the one restore
        (200, 0, 0, 10, 5, 5),    # a burst with room to scale: all five at once, in parallel
        (11, 1, 0, 10, 5, 1),     # one over target: one more
        (10, 1, 0, 10, 5, 0),     # exactly at target: nothing
        (25, 1, 1, 10, 5, 1),     # 25 needs 3; one ready and one starting
        (0, 0, 0, 10, 5, 0),
        (500, 5, 0, 10, 5, 0),    # at max: nothing more, whatever the demand
    ],
)
def test_starts_needed(demand: int, ready: int, starting: int, target: int, max_instances: int,
                       expected: int) -> None:
    assert starts_needed(demand=demand, ready=ready, starting=starting, target=target,
                         max_instances=max_instances) == expected


def test_backoff_doubles_caps_and_resets() -> None:
    b = FailureBackoff(Backoff(initial=1, max=5))
    assert not b.active(100.0)
    assert [b.failed(100.0) for _ in range(5)] == [1, 2, 4, 5, 5]
    assert b.active(104.9) and not b.active(105.0)
    assert b.remaining(103.0) == 2
    b.succeeded()
    assert not b.active(100.0) and b.failed(200.0) == 1


SVC = "services:\n  web:\n    image: x\n    listen: 127.0.0.1:1\n    port: 80\n"


def test_capacity_keys_parse_with_defaults() -> None:
    (web,) = parse_config(SVC, P).services
    assert (web.min_instances, web.max_instances, web.target_connections) == (0, 1, 100)
    assert web.max_connections is None and web.max_waiting == 1000 and web.connect_timeout == 5
    assert web.fallback == "cold-start" and web.proxy_protocol is None and web.backoff == Backoff(1, 60)
    (web,) = parse_config(SVC + "    min_instances: 1\n    max_instances: 4\n    target_connections: 8\n"
                          "    max_connections: 50\n    max_waiting: 0\n    connect_timeout: 250ms\n"
                          "    backoff: {initial: 2s, max: 1m}\n    fallback: none\n    proxy_protocol: v2\n",
                          P).services
    assert (web.min_instances, web.max_instances, web.target_connections, web.max_connections) == (1, 4, 8, 50)
    assert web.max_waiting == 0 and web.connect_timeout == 0.25 and web.backoff == Backoff(2, 60)
    assert web.fallback == "none" and web.proxy_protocol == "v2"


@pytest.mark.parametrize(
    ("extra", "fragment"),
    [
        ("    min_instances: 3\n    max_instances: 2\n", "min_instances (3) must not exceed max_instances (2)"),
        ("    max_instances: 0\n", "max_instances: 0 is out of range: use 1 to 256"),
        ("    target_connections: 0\n", "target_connections: 0 is out of range: use 1 to"),
        ("    proxy_protocol: v3\n", "proxy_protocol: 'v3' is not one of: v1, v2"),
        ("    fallback: retry\n", "fallback: 'retry' is not one of: cold-start, none"),
        ("    backoff: {initial: 5s, max: 1s}\n", "backoff.max (1s) must be at least backoff.initial (5s)"),
        ("    backoff: {jitter: 1}\n", "services.web.backoff.jitter: unknown key"),
        ("    connect_timeout: soon\n", "not a duration"),
    ],
)
def test_capacity_keys_are_validated(extra: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(SVC + extra, P)
    assert fragment in str(e.value) and str(P) in str(e.value)


def test_limits_do_not_change_the_checkpoint() -> None:
    (a,) = parse_config(SVC, P).services
    (b,) = parse_config(SVC + "    max_instances: 9\n    proxy_protocol: v1\n    resources: {memory: 64m}\n",
                        P).services
    (c,) = parse_config(SVC + "    environment: {A: b}\n", P).services
    assert a.checkpoint_fingerprint() == b.checkpoint_fingerprint() != c.checkpoint_fingerprint()
