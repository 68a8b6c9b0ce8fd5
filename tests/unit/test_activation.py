"""The activation path TCP connections and UDP flows share (daemon/activation.py): each way it can end becomes one
reason, one log line and one metric, the same for a connection (proxy.py) and a flow (udp.py). The fakes are typed
against the path's protocols, so mypy checks them as it checks Service, Connection and Flow. The engine tests
(test_admission.py, test_udp.py, test_partial_failure.py) drive the same path through real sockets and restores."""

from __future__ import annotations

import asyncio
import errno
import logging
from dataclasses import dataclass, field

import pytest

from activator.daemon import activation, proxy, udp
from activator.daemon.service import Service
from activator.errors import Rejected, RestoreError


@dataclass
class FakeCounter:
    n: float = 0
    observed: list[float] = field(default_factory=list)

    def inc(self, amount: float = 1) -> None:
        self.n += amount

    def observe(self, value: float) -> None:
        self.observed.append(value)


@dataclass
class FakeMetrics:
    connection_errors: FakeCounter = field(default_factory=FakeCounter)
    first_connection_wait: FakeCounter = field(default_factory=FakeCounter)


@dataclass
class FakeService:
    name: str = "web"
    m: FakeMetrics = field(default_factory=FakeMetrics)
    rejected: list[Rejected] = field(default_factory=list)  # what service.reject counts and tallies

    def reject(self, why: Rejected) -> None:
        self.rejected.append(why)


@dataclass
class FakeClient:
    closed: bool = False
    told: list[Rejected | None] = field(default_factory=list)
    closes: int = 0

    def turned_away(self, why: Rejected | None) -> None:
        self.told.append(why)
        self.closed = True

    def close(self) -> None:
        self.closes += 1
        self.closed = True


@dataclass
class FakeBackend:
    closed: bool = False

    def close(self) -> None:
        self.closed = True


def typed(svc: Service, conn: proxy.Connection, flow: udp.Flow) -> list[object]:
    """Never called: mypy checks that the real service, connection and flow are what the path asks for."""
    asks: activation.Activated = svc
    clients: list[activation.Waiting] = [conn, flow]
    return [asks, *clients]


#: the two kinds of client, as their modules log them
KINDS = [pytest.param("connection", proxy.log, id="tcp-connection"),
         pytest.param("UDP flow from 192.0.2.7", udp.log, id="udp-flow")]

REFUSALS = [Rejected("queue-full", "service 'web' already has 8 connections waiting (max_waiting)"),
            Rejected("backoff", "service 'web' has no instance and is backing off for 4.0s after failed starts", 4),
            Rejected("no-checkpoint", "service 'web' is not serving: no checkpoint (build failed)", 30),
            Rejected("shutting-down", "service 'web' is shutting down"),
            Rejected("resources", "service 'web': no backend socket: Too many open files")]

FAILURES = [OSError(errno.ECONNREFUSED, "Connection refused"),  # the app refused past connect_timeout
            RestoreError("criu restore failed: exit 1")]  # a start that never worked


async def run(svc: FakeService, client: FakeClient, what: str, log: logging.Logger,
              outcome: BaseException | tuple[FakeBackend, bool]) -> FakeBackend | None:
    async def reach() -> tuple[FakeBackend, bool]:
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    return await activation.activate(svc, client, reach, what=what, since=0.0, log=log)


@pytest.mark.asyncio
@pytest.mark.parametrize(("what", "log"), KINDS)
@pytest.mark.parametrize("why", REFUSALS, ids=lambda r: r.reason)
async def test_a_refusal_is_counted_by_reason_once_and_the_client_is_told_why(
        what: str, log: logging.Logger, why: Rejected, caplog: pytest.LogCaptureFixture) -> None:
    svc, client = FakeService(), FakeClient()
    with caplog.at_level(logging.DEBUG):
        assert await run(svc, client, what, log, why) is None
    assert svc.rejected == [why]  # the metric by reason and the tally's line are service.reject's, once
    assert client.told == [why] and client.closed
    assert svc.m.connection_errors.n == 0 and not svc.m.first_connection_wait.observed
    assert not caplog.records  # no line per connection: the tally logs refusals at most once per interval


@pytest.mark.asyncio
@pytest.mark.parametrize(("what", "log"), KINDS)
@pytest.mark.parametrize("error", FAILURES, ids=lambda e: type(e).__name__)
async def test_a_failure_is_one_error_and_one_line_naming_the_client(
        what: str, log: logging.Logger, error: Exception, caplog: pytest.LogCaptureFixture) -> None:
    svc, client = FakeService(), FakeClient()
    with caplog.at_level(logging.DEBUG):
        assert await run(svc, client, what, log, error) is None
    assert svc.m.connection_errors.n == 1 and not svc.rejected
    assert client.told == [None] and client.closed
    assert [(r.name, r.levelno, r.getMessage()) for r in caplog.records] == [
        (log.name, logging.WARNING, f"service=web {what} could not be served: {error}")]


@pytest.mark.asyncio
@pytest.mark.parametrize(("what", "log"), KINDS)
async def test_a_client_that_goes_first_is_closed_and_nothing_is_counted(
        what: str, log: logging.Logger, caplog: pytest.LogCaptureFixture) -> None:
    svc, client = FakeService(), FakeClient()
    waiting = asyncio.Event()

    async def reach() -> tuple[FakeBackend, bool]:
        waiting.set()
        await asyncio.get_running_loop().create_future()  # a restore that has not finished
        raise AssertionError("not reached")

    task = asyncio.ensure_future(activation.activate(svc, client, reach, what=what, since=0.0, log=log))
    await waiting.wait()
    task.cancel()
    with caplog.at_level(logging.DEBUG), pytest.raises(asyncio.CancelledError):
        await task
    assert client.closes == 1 and not client.told
    assert not svc.rejected and svc.m.connection_errors.n == 0 and not caplog.records


@pytest.mark.asyncio
@pytest.mark.parametrize(("what", "log"), KINDS)
async def test_what_was_reached_for_a_client_that_left_meanwhile_is_closed(what: str, log: logging.Logger) -> None:
    svc, client, backend = FakeService(), FakeClient(), FakeBackend()

    async def reach() -> tuple[FakeBackend, bool]:
        client.closed = True  # it left while the backend was being made
        return backend, True

    assert await activation.activate(svc, client, reach, what=what, since=0.0, log=log) is None
    assert backend.closed and not client.told
    assert not svc.m.first_connection_wait.observed and svc.m.connection_errors.n == 0 and not svc.rejected


@pytest.mark.asyncio
@pytest.mark.parametrize(("what", "log"), KINDS)
@pytest.mark.parametrize("waited", [True, False])
async def test_a_reached_client_is_served_and_only_a_wait_for_a_start_is_observed(
        what: str, log: logging.Logger, waited: bool) -> None:
    svc, client, backend = FakeService(), FakeClient(), FakeBackend()
    assert await run(svc, client, what, log, (backend, waited)) is backend  # the control: served, not turned away
    assert not backend.closed and not client.closed and not client.told
    assert len(svc.m.first_connection_wait.observed) == (1 if waited else 0)
    assert svc.m.connection_errors.n == 0 and not svc.rejected


def test_only_the_activators_own_exhaustion_is_the_refusal_resources() -> None:
    for code in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        short = activation.short_of(OSError(code, "Too many open files"), "service 'web': no backend socket")
        assert short is not None and short.reason == "resources"
        assert str(short) == "service 'web': no backend socket: Too many open files"
    for code in (errno.ECONNREFUSED, errno.ECONNRESET, errno.ETIMEDOUT):  # the app's doing: not a refusal
        assert activation.short_of(OSError(code, "x"), "service 'web'") is None
