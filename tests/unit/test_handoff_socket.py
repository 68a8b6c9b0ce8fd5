"""The handoff socket's guards on real (loopback) sockets, in this process: what an app could do to its service's
listening socket (a socket filter, locked or not; a device binding; TCP-MD5 keys; a tiny listen backlog) is seen,
and an untouched socket, or one bound as systemd bound it, is not (the positive controls). The engine tests play
the same against the daemon from inside an instance (tests/engine/test_handoff_attacks.py)."""

from __future__ import annotations

import ctypes
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from activator.checkpoints.instance import Instance
from activator.config.model import ListenAddress, ServiceConfig
from activator.daemon.fleet import Fleet
from activator.daemon.handoff import SO_LOCK_FILTER, HandoffMode, bound_device, listen_backlog, socket_filter
from activator.daemon.metrics import Metrics
from activator.net.sockdiag import keyed

from .test_service import FakeSandbox

SO_ATTACH_FILTER = 26
TCP_MD5SIG = 14  # linux/tcp.h; Python's socket module does not name it


class SockFilter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(SockFilter))]


def attach_drop_all(sock: socket.socket, instructions: int = 1) -> None:
    """A classic BPF program of `instructions` that drops every packet (what scripts/images/attacker.c attaches)."""
    prog = (SockFilter * instructions)()
    for i in range(instructions):
        prog[i] = SockFilter(0x06, 0, 0, 0)  # BPF_RET | BPF_K, 0: drop
    fprog = SockFprog(instructions, prog)
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setsockopt(sock.fileno(), socket.SOL_SOCKET, SO_ATTACH_FILTER, ctypes.byref(fprog),
                       ctypes.sizeof(fprog)):
        raise OSError(ctypes.get_errno(), "SO_ATTACH_FILTER")


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(1024)
    yield sock
    sock.close()


def test_an_untouched_socket_has_no_filter_and_its_backlog(listener: socket.socket) -> None:
    assert socket_filter(listener) is None
    assert listen_backlog(listener) == 1024


@pytest.mark.parametrize("instructions", [1, 4096])  # 4096: the most the kernel allows, far past 1024 bytes
def test_an_attached_filter_is_seen(listener: socket.socket, instructions: int) -> None:
    attach_drop_all(listener, instructions)
    assert socket_filter(listener) == "attached"


def test_a_locked_filter_is_seen(listener: socket.socket) -> None:
    attach_drop_all(listener)
    listener.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
    with pytest.raises(OSError):  # what makes it worse than a filter: nobody can take it off
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_DETACH_FILTER if hasattr(socket, "SO_DETACH_FILTER")
                            else 27, 0)
    assert socket_filter(listener) == "attached and locked"


def test_a_lock_without_a_filter_is_harmless_and_not_reported(listener: socket.socket) -> None:
    listener.setsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER, 1)
    assert socket_filter(listener) is None


def test_a_tiny_backlog_and_a_shut_socket_are_told_apart(listener: socket.socket) -> None:
    listener.listen(1)
    assert listen_backlog(listener) == 1
    listener.shutdown(socket.SHUT_RDWR)
    assert listen_backlog(listener) is None


def md5_key(sock: socket.socket, peer: str) -> None:
    """A TCP-MD5 key for `peer` on the socket (struct tcp_md5sig; what scripts/images/attacker.c sets): IPv4 peers of
    an IPv6 socket by their mapped address, as the kernel wants them."""
    if sock.family == socket.AF_INET:
        addr = struct.pack("=H2x4s", socket.AF_INET, socket.inet_aton(peer))
    else:
        addr = struct.pack("=H2x4x16s", socket.AF_INET6, socket.inet_pton(socket.AF_INET6, f"::ffff:{peer}"))
    sock.setsockopt(socket.IPPROTO_TCP, TCP_MD5SIG,
                    addr.ljust(128, b"\0") + struct.pack("=BBHI", 0, 0, 8, 0) + b"hostile!".ljust(80, b"\0"))


def mode(sock: socket.socket, replaced: list[str] | None = None) -> HandoffMode:
    def replace(why: str) -> None:
        if replaced is None:
            raise AssertionError(f"replaced ({why})")
        replaced.append(why)

    config = ServiceConfig(name="svc", image="x", listen=(ListenAddress("127.0.0.1", 1),), port=80, handoff=True)
    return HandoffMode(config, sock, lambda on: None, Metrics(), replace, lambda: None)


def test_a_device_binding_is_seen_unless_the_socket_was_bound_so(listener: socket.socket) -> None:
    assert bound_device(listener) is None
    handed = mode(listener)
    assert handed.tampered() is None
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    assert bound_device(listener) == "lo"
    assert handed.tampered() == "bound to device lo"
    # Positive control: systemd's BindToDevice= (bound before the mode was made) is how the socket is meant to be
    assert mode(listener).tampered() is None


def test_a_filter_is_told_by_tampered_too(listener: socket.socket) -> None:
    handed = mode(listener)
    attach_drop_all(listener)
    assert handed.tampered() == "a socket filter attached"


def test_tcp_md5_keys_are_seen_on_this_socket_only(listener: socket.socket) -> None:
    neighbour = socket.create_server(("127.0.0.1", 0))
    try:
        assert not keyed(listener) and not keyed(neighbour)
        md5_key(neighbour, "127.0.0.1")
        assert keyed(neighbour) and not keyed(listener)  # an exact lookup: the neighbour's keys are not ours
        md5_key(listener, "192.0.2.1")  # any peer's key counts: that peer is refused, by every holder
        assert keyed(listener)
    finally:
        neighbour.close()


def test_tcp_md5_keys_on_a_dual_stack_wildcard_socket_are_seen() -> None:
    with socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True) as sock:
        assert not keyed(sock)
        md5_key(sock, "127.0.0.1")
        assert keyed(sock)


@pytest.mark.asyncio
async def test_keys_left_by_an_app_already_gone_are_seen_once_and_an_untouched_socket_is_not_looked_at(
        listener: socket.socket) -> None:
    replaced: list[str] = []
    handed = mode(listener, replaced)
    await handed.sample([], None, 0)  # looked at once at first: a socket from systemd may come with an app's keys
    assert replaced == []
    md5_key(listener, "127.0.0.1")  # as if no app had it: nobody could have, so nobody looks (no cost when idle)
    await handed.sample([], None, 0)
    assert replaced == []
    # A restore under way hands the socket to an app, which keys it and is gone before the next look: that look
    # still reads the keys, once.
    handed.set([], starting=1)
    await handed.sample([], None, 0)
    assert replaced == ["TCP-MD5 keys on it"]
    replaced.clear()
    await handed.sample([], None, 0)
    assert replaced == []


@pytest.mark.asyncio
async def test_keys_on_a_socket_the_daemon_starts_with_are_seen(listener: socket.socket) -> None:
    # A socket systemd keeps across a daemon that stopped while an app had it
    md5_key(listener, "127.0.0.1")
    replaced: list[str] = []
    await mode(listener, replaced).sample([], None, 0)
    assert replaced == ["TCP-MD5 keys on it"]


def other_device() -> str:
    """A device of this host that loopback clients do not come in on."""
    names = sorted(name for _, name in socket.if_nameindex() if name != "lo")
    if not names:
        pytest.skip("this host has no network device but lo")
    return names[0]


def test_keys_and_a_device_binding_make_the_socket_deaf(listener: socket.socket) -> None:
    # The threat itself, on a plain socket: what the guards are for
    md5_key(listener, "127.0.0.1")
    with pytest.raises(TimeoutError):  # the SYN is dropped: no answer at all
        socket.create_connection(listener.getsockname(), timeout=1).close()
    with socket.create_server(("127.0.0.1", 0)) as bound:
        bound.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, other_device().encode())
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(bound.getsockname(), timeout=5).close()


def test_keys_are_seen_on_a_socket_bound_to_a_device(listener: socket.socket) -> None:
    # systemd's BindToDevice=: the exact lookup must name the device, or it finds nothing
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
    assert not keyed(listener)
    md5_key(listener, "127.0.0.1")
    assert keyed(listener)


def test_a_socket_that_does_not_listen_is_not_looked_up_as_unkeyed(listener: socket.socket) -> None:
    listener.shutdown(socket.SHUT_RDWR)
    with pytest.raises(LookupError):
        keyed(listener)


@pytest.mark.asyncio
async def test_an_app_that_parked_the_socket_still_has_its_keys_looked_at(listener: socket.socket) -> None:
    # It sent its descriptor to itself (SCM_RIGHTS): no descriptor table shows it, the activator accepts for it
    # again, and it may take the socket back at any time and key it.
    replaced: list[str] = []
    handed = mode(listener, replaced)
    inst = Instance(FakeSandbox("parked"), "restore", 0.0, None)  # type: ignore[arg-type]  # as test_service does
    inst.handoff = True
    for _ in range(2):  # seen without the socket, then looked at as such (past "once after" it went)
        await handed.sample([inst], None, 0)
    assert not handed.reaches(inst) and replaced == []
    md5_key(listener, "127.0.0.1")
    await handed.sample([inst], None, 0)
    assert replaced == ["TCP-MD5 keys on it"]


@pytest.mark.asyncio
async def test_a_replaced_socket_is_bound_as_the_old_one_was() -> None:
    with socket.socket(socket.AF_INET6) as old:
        old.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        old.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        old.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"lo")
        old.bind(("::1", 0))
        old.listen()
        old.shutdown(socket.SHUT_RDWR)  # as replace_socket leaves it
        fresh = await Fleet._bind_again(old, 16, "lo")
        with fresh:
            assert fresh.getsockname()[:2] == old.getsockname()[:2]
            assert fresh.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 1
            assert bound_device(fresh) == "lo" and listen_backlog(fresh) == 16


GONE_DEVICE = """
import socket, subprocess
from tests.unit.test_handoff_socket import mode
subprocess.run(["ip", "link", "add", "gone0", "type", "veth", "peer", "name", "gone1"], check=True)
replaced = []
with socket.create_server(("127.0.0.1", 0)) as sock:
    handed = mode(sock, replaced)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, b"gone0")
    subprocess.run(["ip", "link", "del", "gone0"], check=True)
    print(handed.tampered())
    handed.guard()
    print(replaced)
"""


def test_a_binding_to_a_device_gone_since_is_seen_all_the_same() -> None:
    # An app binds the socket to its own veth's host end (its index is in its /sys/class/net/eth0/iflink), which
    # goes with the instance: the binding stays, by index, and reading its name fails for good from then on. In a
    # network namespace of the test's own, where a device can come and go.
    done = subprocess.run(["unshare", "--net", sys.executable, "-c", GONE_DEVICE], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    tampered, replaced = done.stdout.splitlines()
    assert tampered.startswith("bound to device #") and tampered.endswith(", gone since")
    assert replaced == f"[{tampered!r}]"


@pytest.mark.asyncio
async def test_an_instance_stopped_while_it_is_counted_is_not_said_to_have_closed_the_socket(
        listener: socket.socket, caplog: pytest.LogCaptureFixture) -> None:
    # A reap kills it while the sample reads its descriptor tables: no process, no socket. It did not close the
    # socket (the log said it did, under wrk -c 1000 with reaps between rounds).
    handed = mode(listener)
    dying, closer = (Instance(FakeSandbox(name), "restore", 0.0, None) for name in ("dying", "closer"))  # type: ignore[arg-type]
    for inst in (dying, closer):
        inst.handoff = True
    dying.track.stopping = True
    sample = await handed.sample([dying, closer], None, 0)
    assert sample.left == (closer,)  # positive control: a live one without the socket is one
    assert "instance=dying" not in caplog.text and "instance=closer closed the listening socket" in caplog.text
