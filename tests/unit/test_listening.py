"""The listener contract (daemon/listening.py) and the service listeners (servicelisteners.py) on real loopback
sockets, and the one registry of background tasks (tasks.py). Start-up order and its undo are checked with fakes
that satisfy the Listener protocol (mypy checks them against it)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import logging
import os
import socket
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import cast

import pytest
import yaml
from prometheus_client import CollectorRegistry

from activator.config.addresses import ListenAddress
from activator.config.parse import load_config
from activator.config.settings import AgentSettings
from activator.daemon import listening
from activator.daemon.agent import Agent
from activator.daemon.control import ControlServer
from activator.daemon.fleet import Fleet
from activator.daemon.listening import Listener, ServiceListener
from activator.daemon.metrics import Metrics
from activator.daemon.scrape import ScrapeServer
from activator.daemon.service import Service
from activator.daemon.servicelisteners import HandoffListener, TcpListener, UdpListener
from activator.daemon.udp import Unanswered
from activator.statedir import StateDir
from activator.tasks import Tasks

from .fakeclock import settle

pytestmark = pytest.mark.asyncio


class Fake:
    def __init__(self, name: str, log: list[str], *, fails_start: bool = False, fails_stop: bool = False) -> None:
        self._name = name
        self.log = log
        self.fails_start = fails_start
        self.fails_stop = fails_stop

    @property
    def name(self) -> str:
        return self._name

    async def start(self) -> None:
        self.log.append(f"start {self._name}")
        if self.fails_start:  # half-way: it took something, then failed
            raise OSError(98, "Address already in use")

    async def stop(self) -> None:
        self.log.append(f"stop {self._name}")
        if self.fails_stop:
            raise RuntimeError(f"{self._name} would not stop")


class FakeSocketListener(Fake):
    def __init__(self, name: str, log: list[str], *, fails_stop: bool = False) -> None:
        super().__init__(name, log, fails_stop=fails_stop)
        self._sock = socket.socket()

    @property
    def sock(self) -> socket.socket:
        return self._sock


def checked(x: Listener) -> Listener:  # mypy: each kind satisfies the protocol
    return x


def checked_service(x: ServiceListener) -> ServiceListener:
    return x


class Steps:
    """The lifecycle's _step: one undo step, its failure recorded, never raised."""

    def __init__(self) -> None:
        self.failures: list[str] = []

    async def __call__(self, what: str, fn: Callable[[], Awaitable[None]]) -> None:
        try:
            await fn()
        except Exception as e:
            self.failures.append(f"{what}: {e}")


async def test_a_failure_half_way_through_startup_undoes_only_what_started_in_reverse() -> None:
    log: list[str] = []
    steps = Steps()
    a, b, c, d = (Fake("a", log), Fake("b", log), Fake("c", log, fails_start=True), Fake("d", log))
    stack = contextlib.AsyncExitStack()
    with pytest.raises(OSError):
        for lst in (a, b, c, d):
            await listening.start(stack, checked(lst), steps)
    assert log == ["start a", "start b", "start c"]
    await stack.aclose()
    # c is stopped too (it may hold a socket it bound before failing); d never started and is not touched
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]
    assert steps.failures == []


async def test_a_stop_that_fails_is_reported_and_the_rest_still_stop() -> None:
    log: list[str] = []
    steps = Steps()
    stack = contextlib.AsyncExitStack()
    for lst in (Fake("a", log), Fake("b", log, fails_stop=True), Fake("c", log)):
        await listening.start(stack, lst, steps)
    await stack.aclose()
    assert log[3:] == ["stop c", "stop b", "stop a"]
    assert steps.failures == ["stopping the b: b would not stop"]


def _bound(kind: int = socket.SOCK_STREAM) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", 0))
    if kind == socket.SOCK_STREAM:
        sock.listen(8)
    sock.setblocking(False)
    return sock


class Hello(asyncio.Protocol):
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.write(b"hi")  # type: ignore[attr-defined]  # uvloop's do not subclass asyncio's
        transport.close()


async def test_tcp_listener_serves_until_stopped_then_its_port_refuses() -> None:
    sock = _bound()
    port = sock.getsockname()[1]
    lst = checked_service(TcpListener("web", sock, Hello))
    assert lst.name == f"web TCP listener 127.0.0.1:{port}"
    await lst.start()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await reader.read() == b"hi"  # positive control
    writer.close()
    await lst.stop()
    assert sock.fileno() == -1
    with pytest.raises(ConnectionRefusedError):
        await asyncio.open_connection("127.0.0.1", port)
    await lst.stop()  # twice: nothing happens


async def test_a_listener_never_started_still_releases_its_socket_when_stopped() -> None:
    socks = [_bound(), _bound(), _bound(socket.SOCK_DGRAM)]

    def nobody() -> Service:
        raise AssertionError("no datagram was sent")

    kinds: list[ServiceListener] = [TcpListener("web", socks[0], Hello),
                                    HandoffListener("web", socks[1], Hello, Tasks(), on=True),
                                    UdpListener("dns", socks[2], nobody, Unanswered())]
    for lst in kinds:
        await lst.stop()
    assert [s.fileno() for s in socks] == [-1, -1, -1]


async def test_udp_listener_stop_closes_its_endpoint() -> None:
    sock = _bound(socket.SOCK_DGRAM)

    def nobody() -> Service:
        raise AssertionError("no datagram was sent")

    lst = UdpListener("dns", sock, nobody, Unanswered())
    await lst.start()
    assert lst.front.transport is not None and not lst.front.transport.is_closing()
    await lst.stop()
    assert lst.front.transport.is_closing()  # uvloop closes the descriptor with the transport, a moment later


async def test_handoff_listener_gives_the_apps_their_flags_back_when_it_stops_accepting() -> None:
    sock = _bound()
    sock.setblocking(True)  # as a restored app has it
    tasks = Tasks()
    lst = HandoffListener("web", sock, Hello, tasks, on=False)
    await lst.start()
    try:
        assert not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK  # paused: not touched
        lst.accepting(True)
        assert fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        lst.accepting(False)
        assert not fcntl.fcntl(sock.fileno(), fcntl.F_GETFL) & os.O_NONBLOCK
        lst.accepting(True)
        port = sock.getsockname()[1]
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        assert await asyncio.wait_for(reader.read(), 10) == b"hi"  # accepted by its thread, served on the loop
        writer.close()
    finally:
        await lst.stop()
    assert sock.fileno() == -1
    await tasks.wait()


async def test_tasks_are_cancelled_and_awaited_as_one_and_unawaited_failures_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    tasks = Tasks()
    forever = asyncio.Event()
    waiting = [tasks.spawn(forever.wait(), name=f"w{i}") for i in range(3)]

    async def fails() -> None:
        raise ValueError("boom")

    with caplog.at_level(logging.ERROR, "activator"):
        failed = tasks.spawn(fails(), name="fails")
        awaited = tasks.spawn(fails(), name="awaited", awaited=True)
        await asyncio.wait([failed, awaited])
    assert [r.getMessage() for r in caplog.records if "boom" in r.getMessage()] == \
        ["task fails failed: ValueError('boom')"]
    assert len(tasks) == 3  # the ended ones are let go
    tasks.cancel()
    await tasks.wait()
    assert all(t.cancelled() for t in waiting) and len(tasks) == 0


def _fleet(tmp_path: Path, **svc: object) -> Fleet:
    (tmp_path / "s.yaml").write_text(yaml.safe_dump({
        "settings": {"state_dir": str(tmp_path / "state"), "metrics": None},
        "services": {"web": {"image": "x:1", "listen": "127.0.0.1:1", "port": 80} | svc}}))
    config = load_config(tmp_path / "s.yaml")
    return Fleet(config, StateDir.of(config), Metrics())


async def test_unlisten_stops_every_listener_but_the_kept_ones_even_past_a_failing_stop(tmp_path: Path) -> None:
    fleet = _fleet(tmp_path)
    log: list[str] = []
    a, b, c = (FakeSocketListener("a", log, fails_stop=True), FakeSocketListener("b", log),
               FakeSocketListener("c", log))
    fleet.listening["web"] = [checked_service(a), b, c]
    with pytest.raises(RuntimeError, match="a would not stop"):
        await fleet.unlisten("web", keep=(b.sock,))  # a reload keeping b's address
    assert log == ["stop a", "stop c"]
    assert fleet.listening == {"web": [b]} and fleet.listeners == {"web": [b.sock]}
    await fleet.unlisten("web")
    assert log[-1] == "stop b" and fleet.listening == {} and fleet.listeners == {}
    for lst in (a, b, c):
        lst.sock.close()


async def test_a_handoff_services_new_socket_waits_while_its_apps_accept(tmp_path: Path) -> None:
    fleet = _fleet(tmp_path, handoff=True)
    (first,) = fleet.add_listeners("web", [_bound()])
    assert isinstance(first, HandoffListener) and fleet.accepts("web")
    fleet.accepting("web", False)  # an app accepts from the socket (handoff.py)
    (second,) = fleet.add_listeners("web", [_bound()])  # a reload's new address
    assert isinstance(second, HandoffListener) and not second.on and not fleet.accepts("web")
    fleet.accepting("web", True)
    assert first.on and second.on
    await fleet.unlisten("web")
    assert first.sock.fileno() == second.sock.fileno() == -1


def _every_kind(tmp_path: Path) -> dict[str, Callable[[], Listener]]:
    """One of each kind of listener the daemon has, on loopback or in tmp_path, not started."""

    def tcp() -> Listener:
        sock = socket.create_server(("127.0.0.1", 0))
        return TcpListener("web", sock, asyncio.Protocol)

    def handoff() -> Listener:
        sock = socket.create_server(("127.0.0.1", 0))
        return HandoffListener("web", sock, asyncio.Protocol, Tasks(), on=True)

    def udp() -> Listener:
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.bind(("127.0.0.1", 0))
        sock.setblocking(False)

        def no_service() -> Service:
            raise AssertionError("no datagram is sent in this test")
        return UdpListener("dns", sock, no_service, Unanswered())

    def agent() -> Listener:
        port = socket.create_server(("127.0.0.1", 0))
        free = port.getsockname()[1]
        port.close()
        fleet = _fleet(tmp_path / "agent")
        fleet.config = dataclasses.replace(fleet.config, settings=dataclasses.replace(
            fleet.config.settings, agent=AgentSettings(listen=ListenAddress("127.0.0.1", free))))
        return Agent(fleet)

    return {
        "tcp": tcp, "handoff": handoff, "udp": udp, "agent": agent,
        "control": lambda: ControlServer(tmp_path / "control.sock", {}),
        "metrics": lambda: ScrapeServer(CollectorRegistry(), "127.0.0.1", 0),
    }


@pytest.mark.parametrize("kind", ["tcp", "handoff", "udp", "control", "metrics", "agent"])
@pytest.mark.parametrize("started", [False, True])
async def test_every_listener_stops_unstarted_started_and_twice(tmp_path: Path, kind: str, started: bool) -> None:
    """The contract (listening.py) for each kind: a stop is safe on a listener never started (a start-up cut short
    undoes one it had not reached), on a started one, and a second time (shutdown stops the services' listeners,
    then the exit stack does, for a start-up cut short)."""
    (tmp_path / "agent").mkdir()
    listener = _every_kind(tmp_path)[kind]()
    assert listener.name
    if started:
        await listener.start()
    await listener.stop()
    await listener.stop()
    if kind in ("tcp", "handoff", "udp"):
        await settle()  # uvloop closes a datagram transport's socket on its next iteration
        assert cast(ServiceListener, listener).sock.fileno() == -1  # its socket is released
