"""The Service state machine (admission, scale-out, queueing, backoff, idle reaping) driven with a fake launcher:
no engine, milliseconds per test. The same behaviour is tested against real runc and CRIU in test_scale_out.py
and test_admission.py; this is where its rules are pinned down quickly and exhaustively. Time is a FakeClock
(fakeclock.py) that each test moves on itself: no test waits for a timer."""

from __future__ import annotations

import asyncio
import itertools
import os
import signal
import socket
from dataclasses import dataclass, field
from typing import Any

import pytest

from activator.checkpoints.instance import Instance
from activator.config.model import Backoff, ListenAddress, PreStop, ServiceConfig
from activator.core.capacity import Budget
from activator.daemon.contracts import Launcher, ServiceSandbox
from activator.daemon.handoff import HandoffMode
from activator.daemon.metrics import Metrics
from activator.daemon.service import Service
from activator.daemon.steering import InstanceSample, Sample, Totals
from activator.errors import Rejected, RestoreError
from activator.net.network import Attachment
from activator.net.sampling import Samples
from activator.runtime.readiness import Connect

from .fakeclock import FakeClock, settle

pytestmark = pytest.mark.asyncio

_ids = itertools.count()


@dataclass
class FakeSandbox:
    name: str
    released: bool = False
    asked_to_stop: int = 0  # the signal a graceful stop sent

    async def stop(self, sig: int, grace: float) -> str:
        self.asked_to_stop = sig
        return "exited"

    attachment: Attachment | None = None  # no network: the userspace path

    hold: asyncio.Event | None = None  # release() waits for it

    async def release(self) -> None:
        if self.hold is not None:
            await self.hold.wait()
        self.released = True

    def pid_now(self) -> int | None:
        return None  # no process to watch: its death is not what these tests are about

    frozen: bool = False

    async def freeze(self) -> None:
        self.frozen = True

    def thaw(self) -> None:
        self.frozen = False

    inodes: set[int] = field(default_factory=set)  # the sockets its processes hold (handoff counts these)
    count_frozen_only: bool = False  # a count made while it could still take connections fails the test

    def socket_inodes(self) -> set[int]:
        assert self.frozen or not self.count_frozen_only, "counted while it could still take connections"
        return set(self.inodes)

    cpu: float | None = 0.0  # CPU seconds its processes have used; a test moves it on

    def cpu_seconds(self) -> float | None:
        return self.cpu

    def connector(self, port: int) -> Connect:
        async def refused() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            raise ConnectionRefusedError("the fake has no app")
        return refused


_checked: type[ServiceSandbox] = FakeSandbox  # mypy: the fake has what a service uses of a sandbox


@dataclass(frozen=True)
class FakeCheckpoint:
    """What Service reads of a checkpoint."""

    pages_bytes: int = 4096
    created: float = 0.0
    stop_signal: str = "SIGTERM"
    writes_volumes: tuple[str, ...] = ()


@dataclass
class FakeLauncher:
    """Restores take `delay` seconds of `clock` (or until `gate` is set); the first `failures` restores fail."""

    clock: FakeClock = field(default_factory=FakeClock)
    delay: float = 0.0
    failures: int = 0
    gate: asyncio.Event | None = None
    restores: int = 0
    cold_starts: int = 0
    made: list[FakeSandbox] = field(default_factory=list)
    ksm: Any = None
    hold_release: asyncio.Event | None = None
    standbys: list[Instance] = field(default_factory=list)
    standby: int = 0
    listener: socket.socket | None = None

    async def _make(self, how: str, checkpoint: Any) -> Instance:
        if self.gate is not None:
            await self.gate.wait()
        await self.clock.sleep(self.delay)
        sb = FakeSandbox(f"svc-{next(_ids)}", hold=self.hold_release)
        self.made.append(sb)
        return Instance(sb, how, self.delay, checkpoint)  # type: ignore[arg-type]

    async def restore(self, checkpoint: Any) -> Instance:
        self.restores += 1
        if self.failures:
            self.failures -= 1
            await self.clock.sleep(self.delay)
            raise RestoreError("injected", None, "svc-x")
        return await self._make("restore", checkpoint)

    async def cold_start(self, checkpoint: Any) -> Instance:
        self.cold_starts += 1
        return await self._make("cold-start", checkpoint)

    def refill(self, checkpoint: Any) -> None:
        pass

    async def set_standby(self, n: int, checkpoint: Any) -> None:
        self.standby = n

    async def reshare(self, ksm: Any) -> None:
        self.ksm = ksm

    async def drop_slots_except(self, checkpoint: Any) -> None:
        pass

    async def rehand(self, listener: Any) -> None:
        self.listener = listener

    async def close(self) -> None:
        pass


_checked_launcher: type[Launcher] = FakeLauncher  # mypy: the fake has what a service uses of a launcher


def service(launcher: FakeLauncher, budget: int = 10_000, **keys: Any) -> Service:
    cfg = ServiceConfig(name="svc", image="x", listen=(ListenAddress("127.0.0.1", 1),), port=80, **keys)
    svc = Service(cfg, launcher=launcher, metrics=Metrics().for_service("svc"), budget=Budget(budget),
                  clock=launcher.clock)
    svc.set_checkpoint(FakeCheckpoint())  # type: ignore[arg-type]
    return svc


async def test_a_burst_on_a_single_instance_service_shares_one_restore() -> None:
    fake = FakeLauncher(delay=0.05)
    svc = service(fake)
    leases = [svc.admit() for _ in range(200)]
    acquiring = asyncio.gather(*(lease.acquire() for lease in leases))
    await fake.clock.advance(0.05)
    got = await acquiring
    assert fake.restores == 1 and len({id(inst) for inst, _ in got}) == 1
    assert all(waited for _, waited in got) and svc.instances[0].connections == 200
    for lease in leases:
        lease.release()
    assert svc.instances[0].connections == 0 and svc.open_connections == 0


async def test_scale_out_starts_in_parallel_then_goes_above_target_at_max() -> None:
    fake = FakeLauncher(delay=0.05)
    svc = service(fake, max_instances=3, target_connections=2)
    leases = [svc.admit() for _ in range(6)]
    acquiring = asyncio.gather(*(lease.acquire() for lease in leases))
    await fake.clock.advance(0.05)
    await acquiring
    assert fake.restores == 3 and sorted(i.connections for i in svc.instances) == [2, 2, 2]
    extra = svc.admit()
    inst, waited = await extra.acquire()
    assert not waited and inst.connections == 3 and fake.restores == 3


async def test_the_queue_is_bounded() -> None:
    gate = asyncio.Event()
    svc = service(FakeLauncher(gate=gate), max_waiting=5)
    waiting = [asyncio.ensure_future(svc.admit().acquire()) for _ in range(5)]
    await settle()
    assert svc.waiting == 5
    with pytest.raises(Rejected) as e:
        await svc.admit().acquire()
    assert e.value.reason == "queue-full"
    gate.set()
    await asyncio.gather(*waiting)
    assert svc.waiting == 0


async def test_max_connections_and_the_descriptor_budget() -> None:
    svc = service(FakeLauncher(), budget=3, max_connections=2)
    a, b = svc.admit(), svc.admit()
    with pytest.raises(Rejected) as e:
        svc.admit()
    assert e.value.reason == "max-connections"
    a.release()
    a.release()  # exactly once, however often it is called
    assert svc.open_connections == 1 and svc.budget.used == 1
    c = svc.admit()
    other = service(FakeLauncher(), budget=1)
    other.admit()
    with pytest.raises(Rejected) as e:
        other.admit()
    assert e.value.reason == "resources"
    b.release()
    c.release()


async def test_a_failed_restore_with_no_fallback_backs_the_service_off() -> None:
    fake = FakeLauncher(failures=1)
    svc = service(fake, fallback="none", backoff=Backoff(initial=0.2, max=1))
    with pytest.raises(Rejected) as e:
        await svc.admit().acquire()
    assert e.value.reason == "backoff" and svc.start_backoff.failures == 1
    with pytest.raises(Rejected):  # still backing off: no new attempt
        await svc.admit().acquire()
    assert fake.restores == 1
    await fake.clock.advance(0.19)
    with pytest.raises(Rejected):  # a hair before the backoff ends
        await svc.admit().acquire()
    await fake.clock.advance(0.01)
    lease = svc.admit()
    inst, _ = await lease.acquire()
    assert inst.how == "restore" and fake.restores == 2
    assert svc.start_backoff.failures == 1  # a start is proved by the app, not by CRIU returning:
    lease.connected()  # its first accepted connection
    assert svc.start_backoff.failures == 0


async def test_a_failed_restore_falls_back_to_a_cold_start_and_restores_back_off() -> None:
    fake = FakeLauncher(failures=1)
    svc = service(fake, backoff=Backoff(initial=10, max=10), max_instances=3, target_connections=1)
    first = svc.admit()
    inst, _ = await first.acquire()
    assert inst.how == "cold-start" and fake.restores == 1
    await fake.clock.advance(9.9)
    second = svc.admit()
    inst, _ = await second.acquire()  # restores still back off: cold-started without trying one
    assert inst.how == "cold-start" and fake.restores == 1
    await fake.clock.advance(0.1)
    inst, _ = await svc.admit().acquire()  # the backoff is over: restored again
    assert inst.how == "restore" and fake.restores == 2


async def test_idle_instances_are_reaped_but_a_connection_at_the_deadline_keeps_one() -> None:
    fake = FakeLauncher()
    svc = service(fake, idle_timeout=0.1)
    lease = svc.admit()
    inst, _ = await lease.acquire()
    lease.release()
    await fake.clock.advance(0.099)
    again = svc.admit()
    assert (await again.acquire())[0] is inst  # just before the deadline: the same instance, kept
    await fake.clock.advance(10)
    assert svc.instances == [inst]  # held by an open connection: never reaped
    again.release()
    await fake.clock.advance(0.099)
    assert svc.instances == [inst]  # idle since this release, not since the first one
    await fake.clock.advance(0.001)
    assert svc.instances == [] and fake.made[0].released
    assert not svc._timers_of  # what the service kept about it went with it


async def test_min_instances_are_kept_warm() -> None:
    fake = FakeLauncher()
    svc = service(fake, min_instances=2, max_instances=3, idle_timeout=0.05)
    await settle()
    assert len(svc.instances) == 2
    await fake.clock.advance(10)
    assert len(svc.instances) == 2 and fake.restores == 2  # idle, but min_instances


async def test_no_checkpoint_refuses_at_once_and_says_why_then_recovers() -> None:
    fake = FakeLauncher()
    cfg = ServiceConfig(name="svc", image="x", listen=(ListenAddress("127.0.0.1", 1),), port=80)
    svc = Service(cfg, launcher=fake, metrics=Metrics().for_service("svc"), budget=Budget(10), clock=fake.clock)
    svc.checkpoint_failed("image 'x' is missing", retry_in=5)
    with pytest.raises(Rejected) as e:
        await svc.admit().acquire()
    assert e.value.reason == "no-checkpoint" and "image 'x' is missing" in str(e.value) and fake.restores == 0
    assert e.value.retry_after == 5  # a 503's Retry-After: when the next build is due
    await fake.clock.advance(2)
    with pytest.raises(Rejected) as e:
        await svc.admit().acquire()
    assert e.value.retry_after == 3
    svc.set_checkpoint(FakeCheckpoint())  # type: ignore[arg-type]
    inst, _ = await svc.admit().acquire()
    assert inst.how == "restore" and svc.checkpoint_problem is None


async def test_close_releases_every_instance_and_refuses_newcomers() -> None:
    fake = FakeLauncher()
    svc = service(fake, max_instances=2, target_connections=1)
    leases = [svc.admit() for _ in range(2)]
    await asyncio.gather(*(lease.acquire() for lease in leases))
    await svc.close()
    assert all(sb.released for sb in fake.made) and svc.instances == []
    assert [sb.asked_to_stop for sb in fake.made] == [signal.SIGTERM] * 2  # a drain asks before it kills
    with pytest.raises(Rejected) as e:
        svc.admit()
    assert e.value.reason == "shutting-down"


async def test_the_backoff_gauge_counts_the_wait_for_the_next_checkpoint_build() -> None:
    """Issue 17 item 4: status said "next build in 53 s" while activator_backoff_seconds read 0."""
    m = Metrics()
    cfg = ServiceConfig(name="svc", image="x", listen=(ListenAddress("127.0.0.1", 1),), port=80)
    fake = FakeLauncher()
    svc = Service(cfg, launcher=fake, metrics=m.for_service("svc"), budget=Budget(10), clock=fake.clock)
    svc.checkpoint_failed("image 'x' is not in the local Docker engine", retry_in=53)
    assert m.registry.get_sample_value("activator_backoff_seconds", {"service": "svc"}) == 53
    await fake.clock.advance(3)
    assert m.registry.get_sample_value("activator_backoff_seconds", {"service": "svc"}) == 50
    svc.set_checkpoint(FakeCheckpoint())  # type: ignore[arg-type]
    assert m.registry.get_sample_value("activator_backoff_seconds", {"service": "svc"}) == 0


async def test_group_activation_wakes_keeps_and_reaps_together() -> None:
    """depends_on as plain service logic (issue 17 item 8; the engine version is tests/engine/test_groups.py)."""
    clock = FakeClock()
    fake_web, fake_db = FakeLauncher(clock), FakeLauncher(clock)
    web = service(fake_web, idle_timeout=0.2)
    db = service(fake_db, idle_timeout=0.05)
    web.dependencies, db.dependants = [db], [web]
    lease = web.admit()
    await lease.acquire()
    await settle()
    assert fake_db.restores == 1 and len(db.instances) == 1  # woken with web, without a client of its own
    lease.release()
    await clock.advance(0.12)  # db idle past its 50 ms, web within its 200 ms
    assert len(db.instances) == 1 and db.held() == ["svc"]
    await clock.advance(0.08)  # web reaped: db goes with it, at once
    assert web.instances == [] and db.instances == [] and db.held() == []
    again = web.admit()
    await again.acquire()
    await settle()
    assert fake_db.restores == 2  # and woken together again
    again.release()


async def test_a_stateful_checkpoint_serves_one_instance_then_is_made_again() -> None:
    """An app that keeps its volume's data in memory: one instance at a time, and the next waits for the
    checkpoint made again after it (from the volume as it left it), never for the used one."""
    launcher = FakeLauncher(hold_release=asyncio.Event())
    svc = service(launcher, max_instances=4, target_connections=1, idle_timeout=0.05, stop_grace=0.1)
    used: list[str] = []
    svc.used_up = lambda: used.append("refresh")
    first = FakeCheckpoint(writes_volumes=("/data/db",))  # what the builder found in the dump
    svc.set_checkpoint(first)  # type: ignore[arg-type]
    assert svc.max_instances == 1  # whatever max_instances says
    leases = [svc.admit() for _ in range(3)]
    got = await asyncio.gather(*(lease.acquire() for lease in leases))
    assert len({id(inst) for inst, _ in got}) == 1 and launcher.restores == 1  # overflowed onto the one instance
    assert svc.checkpoint is first and used == []  # type: ignore[comparison-overlap]
    for lease in leases:
        lease.release()
    await launcher.clock.advance(0.05)
    assert svc.instances == []  # reaped: being released (held)
    # A client that comes while the instance is going (before the refresh is asked for) waits, and does not keep
    # the refresh from being asked for.
    early = svc.admit()
    early_wait = asyncio.ensure_future(early.acquire())
    await launcher.clock.advance(10)
    assert used == [] and not early_wait.done()
    assert launcher.hold_release is not None
    launcher.hold_release.set()
    await settle()
    assert used == ["refresh"] and svc.instances == [] and svc.checkpoint is None
    assert not early_wait.done()
    # A connection now waits for the new checkpoint (as for a first build), then restores from it.
    lease = svc.admit()
    waiter = asyncio.ensure_future(lease.acquire())
    await launcher.clock.advance(10)
    assert not waiter.done() and launcher.restores == 1
    second = FakeCheckpoint(writes_volumes=("/data/db",), created=1.0)
    svc.set_checkpoint(second)  # type: ignore[arg-type]
    inst, _ = await asyncio.wait_for(waiter, 5)
    early_inst, _ = await asyncio.wait_for(early_wait, 5)
    assert inst is early_inst and inst.checkpoint is second and launcher.restores == 2  # type: ignore[comparison-overlap]
    lease.release()
    early.release()
    await svc.close()


async def test_stateful_false_or_a_checkpoint_that_writes_nothing_scales_as_usual() -> None:
    launcher = FakeLauncher()
    svc = service(launcher, max_instances=3, target_connections=1, stateful=False)
    svc.set_checkpoint(FakeCheckpoint(writes_volumes=("/data/db",)))  # type: ignore[arg-type]
    assert svc.max_instances == 3
    leases = [svc.admit() for _ in range(3)]
    got = await asyncio.gather(*(lease.acquire() for lease in leases))
    assert len({id(inst) for inst, _ in got}) == 3
    for lease in leases:
        lease.release()
    await svc.close()
    auto = service(FakeLauncher(), max_instances=3)
    assert auto.max_instances == 3  # FakeCheckpoint() writes nothing
    await auto.close()


class Handed:
    """A handoff service's real loopback socket and its real mode (daemon/handoff.py), recording what the mode
    told the activator: accept on the socket (True) or leave it to the apps (False)."""

    def __init__(self, svc: Service) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.accepting: list[bool] = []
        self.changed = asyncio.Event()
        self.held: list[socket.socket] = []

        def fail(why: str) -> None:
            raise AssertionError(f"the socket was not tampered with, yet replaced ({why})")

        self.mode = HandoffMode(svc.config, self.listener, self.accept, Metrics(), fail, lambda: None)
        svc.switch_mode(self.mode)

    def accept(self, on: bool) -> None:
        self.accepting.append(on)
        self.changed.set()

    def app_takes_one(self, sandbox: FakeSandbox) -> None:
        """A client connects and the app accepts it: its descriptor table holds the connection (and the socket)."""
        self.held.append(socket.create_connection(self.listener.getsockname()[:2]))
        conn, _ = self.listener.accept()
        self.held.append(conn)
        sandbox.inodes |= {inode(self.listener), inode(conn)}

    async def until(self, check: Any) -> None:
        """Until check() holds after a change: the count runs in a thread (asyncio.to_thread), off the fake clock."""
        while not check():
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), 10)
        await settle()

    def close(self) -> None:
        for sock in [*self.held, self.listener]:
            sock.close()


def inode(sock: socket.socket) -> int:
    return os.fstat(sock.fileno()).st_ino


async def test_a_handed_instance_is_frozen_counted_and_killed_or_thawed_and_kept() -> None:
    fake = FakeLauncher()
    svc = service(fake, idle_timeout=0.2, max_instances=2)
    handed = Handed(svc)
    lease = svc.admit()
    inst, _ = await lease.acquire()
    inst.handoff = True
    sandbox = fake.made[0]
    sandbox.count_frozen_only = True
    handed.app_takes_one(sandbox)
    svc._resteer()
    lease.release()
    assert handed.accepting[-1] is False  # the app accepts: the activator does not
    await fake.clock.advance(0.199)
    assert handed.accepting[-1] is False and not inst.sandbox.frozen  # not idle long enough: not looked at
    # Idle by its own clock, but an app-accepted connection is open: frozen, counted, thawed and kept.
    await fake.clock.advance(0.001)
    await handed.until(lambda: handed.accepting[-2:] == [True, False])  # withdrawn for the count, then back
    assert inst in svc.instances and not inst.sandbox.frozen and not inst.track.withdrawn
    # None open (the app closed it): killed frozen (a frozen app cannot act on a signal), never asked to stop.
    sandbox.inodes = {inode(handed.listener)}
    await fake.clock.advance(0.2)
    await handed.until(lambda: not svc.instances)
    assert sandbox.released and sandbox.asked_to_stop == 0 and handed.accepting[-1] is True
    handed.close()


async def test_a_handoff_sample_counts_what_the_apps_took_beside_the_activator() -> None:
    """The host counts every new connection to the socket; the activator's own accepts (`arrived`) are in that
    count and are taken off, so the service's served total is what its apps took plus what it handed them."""
    fake = FakeLauncher()
    svc = service(fake, max_instances=2)
    handed = Handed(svc)
    lease = svc.admit()  # the first connection reached the activator (no app ran): arrived 1
    inst, _ = await lease.acquire()
    inst.handoff = True
    lease.release()
    sandbox = fake.made[0]
    handed.app_takes_one(sandbox)
    counted = Samples({}, {}, {"svc": 1 + 5})  # the host: 6 new connections, 1 of them the activator's
    sample = await handed.mode.sample(list(svc.instances), counted, svc.arrived)
    assert sample.totals == Totals(connections=5) and sample.instances[inst].new == 5
    assert sample.instances[inst].open == 1 and sample.instances[inst].active
    svc.fold(sample, fake.clock.now())
    assert inst.track.kernel == 1 and inst.track.kernel_served == 5 and inst.track.served == 1
    assert svc.m.connections._value.get() == 5  # the lease's own is counted where it is accepted (proxy.py)
    # Read a moment later, the activator's count may be ahead of the host's: never counted down, never twice.
    again = await handed.mode.sample(list(svc.instances), Samples({}, {}, {"svc": 6}), svc.arrived + 1)
    assert again.totals == Totals(connections=5) and again.instances[inst].new == 0
    # A reload's new definition carries the counts on.
    successor = service(FakeLauncher(), max_instances=2)
    successor.take_counters_from(svc)
    assert successor.totals == Totals(connections=5) and successor.arrived == svc.arrived
    await svc.close()
    await successor.close()
    handed.close()


async def test_a_handoff_count_survives_a_counter_put_back_and_credits_no_idle_instance() -> None:
    """Counted by differences: a host counter put back from zero (a repaired table) loses nothing. Only what an
    instance was seen to take counts for it: an idle instance, whose app holds the socket and sockets of its own,
    is credited nothing and is not made active."""
    fake = FakeLauncher()
    svc = service(fake, max_instances=2)
    handed = Handed(svc)
    leases = [svc.admit() for _ in range(2)]
    busy, _ = await leases[0].acquire()
    idle = await fake.restore(FakeCheckpoint())  # a second instance, which sits idle
    svc.instances.append(idle)
    for inst in (busy, idle):
        inst.handoff = True
    for lease in leases:
        lease.release()
    busy_box, idle_box = fake.made[0], fake.made[-1]
    idle_box.inodes = {inode(handed.listener), 999_999_001}  # the socket and an outbound socket of its own
    handed.app_takes_one(busy_box)
    first = await handed.mode.sample(list(svc.instances), Samples({}, {}, {"svc": 2 + 4}), 2)
    assert first.instances[busy].new == 4 and first.instances[idle].new == 0
    assert not first.instances[idle].active and first.instances[busy].active
    put_back = await handed.mode.sample(list(svc.instances), Samples({}, {}, {"svc": 3}), 2)  # a repaired table
    assert put_back.totals == Totals(connections=4 + 3)
    failed = await handed.mode.sample(list(svc.instances), None, 2)  # the counter not read: the looks only
    assert failed.totals == Totals(connections=7)  # nothing new seen, and the idle one's own sockets are not clients
    await svc.close()
    handed.close()


async def test_a_stopped_handoff_mode_never_turns_accepting_on_again() -> None:
    """A reload's old definition drains with its mode stopped; the socket is the new definition's by then, and
    the old one closing must not make the activator accept on it while the new one's apps do."""
    fake = FakeLauncher()
    svc = service(fake)
    handed = Handed(svc)
    handed.mode.stop()
    handed.accepting.clear()
    await svc.close()  # withdraw_all: set([]) on the stopped mode
    assert handed.accepting == []
    new_definition = service(FakeLauncher())
    successor = Handed(new_definition)
    successor.mode.carry_from(handed.mode)  # and its counts go on from the old one's
    assert (successor.mode._taken, successor.mode._counted) == (handed.mode._taken, handed.mode._counted)
    await new_definition.close()
    handed.close()
    successor.close()


async def test_a_fold_is_the_same_whatever_the_mode() -> None:
    """Service.fold reads one Sample type: activity, connections served, bytes, demand waiting, counters that a
    repaired table started again from zero."""
    fake = FakeLauncher()
    svc = service(fake, max_instances=3, target_connections=2)
    lease = svc.admit()
    inst, _ = await lease.acquire()
    lease.release()
    now = fake.clock.now()
    svc.fold(Sample({inst: InstanceSample(open=3, active=True, new=4, bytes_in=10, bytes_out=20)},
                    Totals(connections=4, rejected=2), waiting=5), now + 1)
    assert (inst.track.kernel, inst.track.kernel_served, inst.track.established) == (3, 4, 1)
    assert svc._timers(inst).idle_since == now + 1
    assert svc.m.rejected["max-connections"]._value.get() == 2 and svc.m.bytes_out._value.get() == 20
    assert svc.starting >= 1  # 3 open and 5 waiting over a target of 2 per instance: more are started
    svc.fold(Sample(totals=Totals(connections=1)), now + 2)  # put back from zero: its 1 is new
    assert svc.m.connections._value.get() == 5
    await svc.close()


async def test_an_app_busy_by_cpu_is_kept_until_a_quiet_window() -> None:
    """idle_cpu_below: no connection for idle_timeout is not enough while the app works on its own."""
    fake = FakeLauncher()
    svc = service(fake, idle_timeout=0.1, idle_cpu_below=0.05)
    lease = svc.admit()
    inst, _ = await lease.acquire()
    lease.release()
    sb = fake.made[0]
    for _ in range(3):  # 0.05 s of CPU per 0.1 s window: 50% of a CPU, busy
        assert sb.cpu is not None
        sb.cpu += 0.05
        await fake.clock.advance(0.1)
        assert svc.instances == [inst]
    await fake.clock.advance(0.099)
    assert svc.instances == [inst]
    await fake.clock.advance(0.001)  # a whole quiet window: reaped
    assert svc.instances == [] and sb.released
    assert svc.m.idle_cpu_busy._value.get() == 3


async def test_without_a_cgroup_to_ask_cpu_does_not_keep_an_instance() -> None:
    fake = FakeLauncher()
    svc = service(fake, idle_timeout=0.05, idle_cpu_below=0.01)
    lease = svc.admit()
    await lease.acquire()
    fake.made[0].cpu = None
    lease.release()
    await fake.clock.advance(0.05)
    assert svc.instances == [] and svc.m.idle_cpu_busy._value.get() == 0


async def test_a_schedule_window_keeps_one_warm_and_its_end_lets_it_go() -> None:
    fake = FakeLauncher()
    svc = service(fake, idle_timeout=0.05)
    svc.keep_warm(True)
    await settle()
    assert len(svc.instances) == 1 and svc.kept_warm  # started ahead of any client
    await fake.clock.advance(10)
    assert len(svc.instances) == 1  # idle, but kept
    svc.keep_warm(False)
    await fake.clock.advance(0)  # idle for longer than idle_timeout already: it goes at once
    assert svc.instances == [] and fake.made[0].released


async def test_pre_stop_that_cannot_connect_is_counted_and_the_stop_goes_on() -> None:
    fake = FakeLauncher()
    svc = service(fake, idle_timeout=0.05, pre_stop=PreStop(http_path="/flush", timeout=1.0))
    lease = svc.admit()
    await lease.acquire()
    lease.release()
    await fake.clock.advance(0.05)
    assert svc.instances == [] and fake.made[0].released and fake.made[0].asked_to_stop
    assert svc.m.pre_stop["failed"]._value.get() == 1


async def test_rejections_are_logged_as_one_tally_per_interval_and_none_is_lost(
        caplog: pytest.LogCaptureFixture) -> None:
    fake = FakeLauncher()
    svc = service(fake, max_connections=1)
    held = svc.admit()

    def lines() -> list[str]:
        return [r.getMessage() for r in caplog.records if "admission control" in r.getMessage()]
    for _ in range(4):
        with pytest.raises(Rejected) as e:
            svc.admit()
        svc.reject(e.value)
    assert len(lines()) == 1 and "1 max-connections" in lines()[0]  # the first at once, the rest wait
    await fake.clock.advance(9.9)
    assert len(lines()) == 1
    await fake.clock.advance(0.1)  # the interval is over: the other three, though nothing came since
    assert len(lines()) == 2 and "3 max-connections" in lines()[1]
    await fake.clock.advance(60)
    assert len(lines()) == 2  # nothing new, nothing logged
    held.release()
