"""`activator top`: a frame from two status answers (pure; the engine test runs it against a daemon)."""

from __future__ import annotations

from typing import Any

from activator.core.liveview import frame


def status(pid: int, started: int, cpu: float | None, *, instances: int = 1) -> dict[str, Any]:
    return {"pid": pid, "services": [
        {"name": "web", "max_instances": 4, "starting": 0, "waiting": 2, "open_connections": 7,
         "started_total": started, "checkpoint": {"pages_bytes": 1}, "backoff_seconds": 0,
         "instances": [{"name": f"web-{n}", "how": "restore", "age_seconds": 65, "connections": 3,
                        "kernel_connections": 4, "served": 120, "memory_bytes": 50 * 2**20,
                        "cpu_seconds": cpu} for n in range(instances)]},
        {"name": "idle", "max_instances": 1, "starting": 0, "waiting": 0, "open_connections": 0,
         "started_total": 0, "checkpoint": {"pages_bytes": 1}, "backoff_seconds": 0, "instances": []},
    ]}


def line(lines: list[str], start: str) -> str:
    return next(x for x in lines if x.startswith(start))


def test_rates_are_the_difference_between_two_answers() -> None:
    lines = frame(status(10, 5, 3.0, instances=2), status(10, 3, 2.0, instances=2), 2.0, "hdr")
    web = line(lines, "web ")
    assert "2/4" in web and " 7 " in web and "1.0" in web  # 2 starts in 2 s
    assert "100.0 MiB" in web and "100.0%" in web  # two instances, each 0.5 s of CPU per second
    inst = line(lines, "  web-0")
    assert "7 conns" in inst and "120 served" in inst and "50.0%" in inst and "65s" in inst
    assert line(lines, "idle ").endswith("asleep")


def test_the_first_frame_and_a_restarted_daemon_show_no_rates() -> None:
    for prev in (None, status(11, 3, 2.0)):  # no earlier answer; another daemon (its counters began again)
        lines = frame(status(10, 5, 3.0), prev, 1.0, "hdr")
        web = line(lines, "web ")
        assert web.split()[5] == "-" and web.split()[-1] == "-", web
    # a counter that went down (a new instance of the same name cannot happen, but a reset cgroup can): no rate
    assert line(frame(status(10, 5, 1.0), status(10, 5, 2.0), 1.0, "h"), "  web-0").endswith("-")
