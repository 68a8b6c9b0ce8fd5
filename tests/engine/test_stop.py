"""Stopping an instance the way `docker stop` does: its stop signal (the service's stop_signal, else the image's
STOPSIGNAL, else SIGTERM), then SIGKILL after stop_grace. An app without a handler for it is killed at once (as
PID 1 of its namespace it would never see the signal, so waiting would only keep its memory longer)."""

from __future__ import annotations

import logging
import subprocess
import time
from collections.abc import Iterator

import pytest

from tests.conftest import BUSYBOX, ECHO, echo, eventually

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

USR1_IMAGE = "activator-test/stopsignal:latest"
# PID 1 is a shell that runs the echo server and exits on the signal it traps (or never, for "stubborn").
TRAPPING = "trap 'kill $!; exit 0' {sig}; echo-server 9000 & while :; do wait; done"
STUBBORN = "trap 'echo not now' TERM; echo-server 9000 & while :; do wait; done"


@pytest.fixture
def usr1_image() -> Iterator[str]:
    build = subprocess.run(["docker", "build", "-q", "-t", USR1_IMAGE, "-"],
                           input=f"FROM {BUSYBOX}\nSTOPSIGNAL SIGUSR1\n", capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    yield USR1_IMAGE
    subprocess.run(["docker", "rmi", "-f", USR1_IMAGE], capture_output=True)


async def reaped(run, name: str) -> float:  # type: ignore[no-untyped-def]
    """Wake the service, let it go idle, and time its teardown (from reap to released)."""
    assert await echo(run.port(name), b"x") == b"x"
    svc = run.act.services[name]
    await eventually(lambda: not svc.instances, what="the reap")
    t0 = time.monotonic()
    await eventually(lambda: not svc._releasing, timeout=30, what="the release")
    return time.monotonic() - t0


def killed_lines(caplog, name: str) -> list[str]:  # type: ignore[no-untyped-def]
    return [r.getMessage() for r in caplog.records if f"service={name} " in r.getMessage()
            and "did not exit" in r.getMessage()]


async def test_the_stop_signal_is_sent_and_waited_for(start, usr1_image, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO, logger="activator")
    quick = {"idle_timeout": "300ms", "stop_grace": "20s"}
    run = await start({
        "term": ECHO | quick | {"command": ["sh", "-c", TRAPPING.format(sig="TERM")]},
        "usr1": ECHO | quick | {"image": usr1_image, "command": ["sh", "-c", TRAPPING.format(sig="USR1")]},
        "quit": ECHO | quick | {"stop_signal": "QUIT", "command": ["sh", "-c", TRAPPING.format(sig="QUIT")]},
    })
    for name in ("term", "usr1", "quit"):
        assert await reaped(run, name) < 10  # it exited on its signal: no 20 s grace spent
        assert not killed_lines(caplog, name), name


async def test_an_app_that_ignores_it_is_killed_after_the_grace_or_at_once(start, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.DEBUG, logger="activator")  # "no handler, killed at once" is a debug line (not news)
    run = await start({
        "stubborn": ECHO | {"idle_timeout": "300ms", "stop_grace": "1s", "command": ["sh", "-c", STUBBORN]},
        "deaf": ECHO | {"idle_timeout": "300ms", "stop_grace": "1m"},  # echo-server handles no signal
    })
    assert await reaped(run, "stubborn") >= 1
    assert killed_lines(caplog, "stubborn")
    assert await reaped(run, "deaf") < 30  # not the minute: nothing to wait for
    assert killed_lines(caplog, "deaf")
