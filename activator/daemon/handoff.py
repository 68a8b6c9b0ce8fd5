"""A service's handoff path (`handoff: true`): its instances accept from the service's own listening socket.

CRIU (with scripts/criu-patches/0002) puts the socket the activator listens on into each restored app in place of
the one the app listened on at dump time. A connection then goes from the client to the app as if the app itself
were listening on the host: no DNAT, veth or bridge, no byte through the activator. The kernel spreads accepts
over the instances blocked in accept() or epoll on that socket.

While one such instance runs or is being restored, the activator does not accept on the socket at all
(Fleet.accepting): a connection the activator took would have to be handed to an app through the same socket,
where the activator could take it again. And the socket's file flags are shared with the apps: CRIU gives a restored
app its own (blocking, for most), and an accept() of the activator's that an app won the race for would then block
the event loop for good (seen: busybox httpd). So the activator accepts only while no app can run: none runs (the
last one reaped, or frozen to be counted before its reap) and none is being restored; it makes the socket
non-blocking when it starts and gives the apps their flags back when it stops. Connections it held when the restore
began are passed on by connecting to the socket's own address (proxy.connect_handed); those that come during the
restore wait in the accept queue for the app.

Everything else an app can do to the socket, it does for every holder (the socket and its open file are one):
- its status flags (O_NONBLOCK cleared, even while it hides its descriptor in an SCM_RIGHTS message so that the
  activator believes it closed the socket): the activator's accept() is in a thread of its own (acceptor.py),
  where a wait holds up that one service, never the event loop;
- shutdown(2): listening again, each meter tick (keep_listening);
- listen() with a tiny backlog: its own backlog given back, each tick (keep_backlog);
- what makes the socket deaf for every holder and stays after the app is gone: a socket filter (SO_ATTACH_FILTER or
  SO_ATTACH_BPF; one that drops everything, and SO_LOCK_FILTER keeps anyone from detaching it), a device it is
  bound to (SO_BINDTODEVICE, allowed to anyone on a socket not bound yet: a connection that comes in on another
  device is refused), TCP-MD5 keys (a SYN from a keyed peer without the signature is dropped): seen each tick
  (tampered; the keys, from the host's socket table, at first, while any instance has the socket and once after),
  every instance of the service is killed and the socket replaced by a fresh one on the same address
  (Fleet.replace_socket);
- options every connection accepted from it inherits, the activator's too: put back on each (acceptor.RESET).

Counting: the apps' connections live in the host's socket table (sockdiag.py); an instance's are those whose
inode is in its processes' descriptor tables. An instance to be reaped is frozen first (it can take no new
connection from the socket, and its table cannot change), counted, and killed frozen with none open, or thawed
and kept; a connection waiting in the accept queue meanwhile stays there for the next taker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import os
import socket
import struct
from collections.abc import Callable, Mapping

from activator.checkpoints.instance import Instance
from activator.config.service import ServiceConfig
from activator.core.clock import Clock
from activator.net import sockdiag
from activator.net.rules import ident
from activator.net.sampling import Samples

from .metrics import Metrics
from .sockets import BACKLOG
from .steering import InstanceSample, Mode, Sample, Totals, counted_since

log = logging.getLogger("activator")

SO_GET_FILTER = 26  # asm-generic/socket.h (= SO_ATTACH_FILTER); Python's socket module names neither
SO_LOCK_FILTER = 44
TCP_LISTEN = 10
IFNAMSIZ = 16
_libc = ctypes.CDLL(None, use_errno=True)
_libc.getsockopt.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_void_p,
                             ctypes.POINTER(ctypes.c_uint32)]


def socket_filter(sock: socket.socket) -> str | None:
    """What socket filter the socket has: None, "attached" or "attached and locked".

    Asked with a zero length, the kernel answers the filter's length in instructions and copies nothing (with any
    other length it copies 8 bytes per instruction into a buffer sized in bytes: Python's getsockopt() must not be
    used). A filter loaded as eBPF has no classic program to report: EACCES, attached just the same."""
    size = ctypes.c_uint32(0)
    if _libc.getsockopt(sock.fileno(), socket.SOL_SOCKET, SO_GET_FILTER, None, ctypes.byref(size)) == 0:
        attached = size.value > 0
    else:
        err = ctypes.get_errno()
        if err != errno.EACCES:
            raise OSError(err, os.strerror(err))
        attached = True
    if not attached:
        return None
    return "attached and locked" if sock.getsockopt(socket.SOL_SOCKET, SO_LOCK_FILTER) else "attached"


def bound_device(sock: socket.socket) -> str | None:
    """The name of the device the socket is bound to, or None. OSError (ENODEV) once that device is gone: the
    socket stays bound to its index (bound_index)."""
    name = sock.getsockopt(socket.SOL_SOCKET, socket.SO_BINDTODEVICE, IFNAMSIZ).split(b"\0", 1)[0]
    return name.decode(errors="replace") or None


def bound_index(sock: socket.socket) -> int:
    """The index of the device the socket is bound to (SO_BINDTODEVICE and SO_BINDTOIFINDEX are one setting), 0
    for none; read whether that device still exists or not."""
    return int(sock.getsockopt(socket.SOL_SOCKET, sockdiag.SO_BINDTOIFINDEX))


def listen_backlog(sock: socket.socket) -> int | None:
    """A listening socket's backlog (TCP_INFO reports it as tcpi_sacked for a listener), None if not listening."""
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 32)
    if info[0] != TCP_LISTEN:
        return None
    return int(struct.unpack_from("I", info, 28)[0])


class HandoffMode:
    """The handoff mode (steering.py): which of a service's instances take connections from its socket, how many
    each holds and took, and the socket kept as the activator bound it."""

    name = "handoff"
    steers = True
    failures = 0  # nothing of it is a rule the kernel could refuse

    def __init__(self, config: ServiceConfig, listener: socket.socket, accepting: Callable[[bool], None],
                 metrics: Metrics, replace: Callable[[str], None], relisten: Callable[[], None]) -> None:
        self.config = config
        self.listener = listener
        self.inode = os.fstat(listener.fileno()).st_ino
        self.family = listener.family
        host, port = listener.getsockname()[:2]
        self.host, self.port = str(host), int(port)
        # where the activator passes on a connection it holds: the socket's own address (loopback for a wildcard)
        wildcard = {"0.0.0.0": "127.0.0.1", "::": "::1"}
        self.address: tuple[str, int] | None = (wildcard.get(host, host), self.port)
        self._accepting = accepting
        self._metrics = metrics
        self._replace = replace
        self._relisten = relisten
        self.backlog = listen_backlog(listener) or BACKLOG  # as it was bound (systemd's Backlog=, or ours)
        # as it was bound (systemd's BindToDevice=): its index is compared, its name bound again on a replacement
        self.device_index = bound_index(listener)
        try:
            self.device = bound_device(listener) if self.device_index else None
        except OSError:  # that device is gone already: a replacement is bound to none
            self.device = None
        self.replacing = False  # Fleet.replace_socket is under way
        self.stopped = False
        self._held: dict[Instance, frozenset[int]] = {}  # each handed instance's connections at the last look
        self._left: set[Instance] = set()  # handed the socket, seen without it since (Instance.handoff stays)
        # an app held the socket since its TCP-MD5 keys were last looked at; at first, unknown (a socket from
        # systemd outlives a daemon that stopped while an app had it)
        self._touched = True
        self._keys_unread = False  # the last look for them failed (said once until one works again)
        self._taken = 0  # connections the apps took, as counted so far (never goes down)
        self._counted = 0  # the host's counter at the last look
        self._arrived = 0  # the activator's own connections on the socket at the last look
        self._debt = 0  # the activator's connections the host's counter had not counted yet at the last look

    def reaches(self, inst: Instance) -> bool:
        return inst.handoff and inst not in self._left

    def set(self, instances: list[Instance], starting: int = 0) -> None:
        """The activator accepts only while no app can: none runs, and none is being restored (a restored app
        accepts from the moment CRIU resumes it, before the restore returns). Once stopped, never again: the
        socket may be a reload's new definition's now."""
        if self.stopped:
            return
        self._touched |= bool(starting) or any(i.handoff for i in instances)
        self._accepting(not starting and not any(self.reaches(i) for i in instances))

    def open_count(self, inst: Instance) -> int:
        """Blocking: the connections its processes hold. On an error, one: never reaped on a count not made."""
        try:
            table = sockdiag.read(self.family, self.port)
            return len(table.accepted & inst.sandbox.socket_inodes())
        except Exception as e:
            log.warning("instance=%s: counting its connections failed (%s); kept for now", inst.name, e)
            return 1

    async def retire(self, inst: Instance, clock: Clock, resteer: Callable[[], None]) -> int:
        """Frozen, it takes no new connection from the socket and its descriptor table cannot change, so the
        count is exact; then killed frozen, or thawed and kept (by the service). Frozen first, then out of set():
        the activator never competes with a running app for a connection."""
        try:
            await inst.sandbox.freeze()
            resteer()
            return await asyncio.to_thread(self.open_count, inst)
        except Exception as e:
            log.warning("service=%s instance=%s could not be frozen to be counted (%s); kept", self.config.name,
                        inst.name, e)
            return 1

    async def sample(self, instances: list[Instance], shared: Samples | None, arrived: int) -> Sample:
        """Each handed instance's open connections and the ones it took since the last look, the accept queue,
        who closed the socket, and the service's total.

        The total is exact where the host network counts the service's connections (an input-hook counter of
        completed handshakes, rules.limit_rules; IPv4): what it counted since the last look, less the activator's
        own connections on the socket since then (`arrived`: what its listener took, and what it made to pass a
        held client on). Counted by differences, so a counter put back from zero (a repaired table) loses nothing;
        what the activator counted before the host did is carried to the next look, never taken off twice. Which
        instance took each is known only for connections open at a look (their inodes in its descriptor table):
        the total is split over the instances in proportion to those, so one instance's figure is exact and
        several instances' add up to the total. Without the counter (IPv6, no network, a failed read) the total is
        what the looks saw."""
        handed = [i for i in instances if self.reaches(i)]
        for gone in set(self._held) - set(handed):
            del self._held[gone]
        self._left &= set(instances)
        # TCP-MD5 keys are looked at while any app has the socket (one that parked it too: it may take it back),
        # and once after: an app may key it and be gone before the next look.
        holders = any(i.handoff for i in instances)
        look = self._touched or holders
        self._touched = holders
        table, held, keyed = await asyncio.to_thread(self._read, handed) if look else (None, {}, False)
        self._keys(keyed)
        accepted = {inst: table.accepted & inodes for inst, inodes in held.items()} if table else {}
        seen = {inst: len(now - self._held.get(inst, frozenset())) for inst, now in accepted.items()}
        self._held.update(accepted)
        counted = shared.steered.get(ident(self.config.name)) if shared is not None else None
        mine, self._arrived = arrived - self._arrived, arrived
        if counted is None:  # what the looks saw; the counter, when it answers again, will have these too
            new = sum(seen.values())
            self._debt += mine + new
        else:
            new = counted_since(counted, self._counted) - mine - self._debt
            self._counted, self._debt = counted, max(0, -new)
        self._taken += max(0, new)
        split = _split(max(0, new), seen, {inst: len(now) for inst, now in accepted.items()})
        out = {inst: InstanceSample(open=len(now), active=bool(now) or len(now) != inst.track.kernel
                                    or bool(seen[inst]), new=split.get(inst, 0)) for inst, now in accepted.items()}
        # One stopped while its table was read (a reap's kill) has no socket left either: gone, not a closer
        left = tuple(inst for inst, inodes in held.items() if self.inode not in inodes and not inst.track.stopping)
        for inst in left:  # it takes nothing from the socket any more: the activator accepts for it again
            log.warning("service=%s instance=%s closed the listening socket it was handed; the activator accepts "
                        "for it again", self.config.name, inst.name)
            self._left.add(inst)
        return Sample(out, None if self.stopped else Totals(connections=self._taken),
                      waiting=table.backlog if table else 0, left=left)

    def carry_from(self, previous: Mode) -> None:
        """A new mode for the same service and socket (a reload's new definition, a replaced socket): the counts
        go on from where the previous one left them, or the history would be credited to the new instances."""
        if isinstance(previous, HandoffMode):
            self._counted, self._arrived, self._debt = previous._counted, previous._arrived, previous._debt
            self._taken = previous._taken

    def _read(self, handed: list[Instance]) -> tuple[sockdiag.PortSockets | None, dict[Instance, frozenset[int]],
                                                     bool | Exception]:
        """Blocking: the port's connections (if an app takes from the socket), and whether the socket has keys."""
        table = sockdiag.read(self.family, self.port) if handed else None
        keyed: bool | Exception
        try:
            keyed = sockdiag.keyed(self.listener)
        except Exception as e:  # e.g. not listening (an app shut it down; keep_listening's) or closed
            keyed = e
        return table, {inst: frozenset(inst.sandbox.socket_inodes()) for inst in handed}, keyed

    def _keys(self, keyed: bool | Exception) -> None:
        if self.replacing or self.stopped:  # the socket is going (or gone): nothing to say of it
            return
        if isinstance(keyed, Exception):  # not looked at: looked at next tick, whether an app still has it or not
            self._touched = True
            if not self._keys_unread:
                log.warning("service=%s looking for TCP-MD5 keys on its listening socket failed (%s); looking "
                            "again each tick", self.config.name, keyed)
            self._keys_unread = True
            return
        self._keys_unread = False
        if keyed:
            self._replace("TCP-MD5 keys on it")

    def tampered(self) -> str | None:
        """What an app did to the socket that makes it deaf for every holder and outlives the app (the module's
        docstring), read with getsockopt (the keys are not: sample reads them from the host's socket table)."""
        if (what := socket_filter(self.listener)) is not None:
            return f"a socket filter {what}"
        if (index := bound_index(self.listener)) != self.device_index:
            if not index:
                return "its device binding taken off"
            try:
                name = socket.if_indextoname(index)
            except OSError:  # gone since (an instance's veth): the socket refuses everyone all the same
                name = f"#{index}, gone since"
            return f"bound to device {name}"
        return None

    def guard(self) -> None:
        """What an app may have done to the socket it shares with the activator (see the module's docstring),
        undone: a filter or a device binding (the socket replaced), a shrunk backlog, a shutdown."""
        if self.replacing or self.stopped or self.listener.fileno() < 0:
            return
        name = self.config.name
        try:
            what = self.tampered()
        except OSError as e:  # what an app did cannot even be read: not a socket to keep
            what = f"its options unreadable ({e.strerror})"
        if what is not None:
            self._replace(what)
            return
        if (found := self.keep_backlog()) is not None:
            self._metrics.handoff_backlog.labels(name).inc()
            log.warning("service=%s its listening socket's backlog had been set to %d (by an app it was handed to); "
                        "%d again", name, found, self.backlog)
        if self.keep_listening():
            self._relisten()
            self._metrics.handoff_repairs.labels(name).inc()
            log.warning("service=%s its listening socket had been shut down (by an app it was handed to); listening "
                        "again", name)

    def stop(self) -> None:
        self.stopped = True

    def keep_listening(self) -> bool:
        """An app may shutdown() the socket it was handed, which is the activator's socket too: listening again on
        the bound socket is all it takes to serve again. True if it had to (one getsockopt otherwise)."""
        if self.listener.fileno() < 0 or self.listener.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            return False
        # A socket bound to port 0 (as a test binds) lost its port in the shutdown, though getsockname() still
        # names it: bound again, or listen() would pick a new one. One bound to its port keeps it (EINVAL).
        with contextlib.suppress(OSError):
            self.listener.bind((self.host, self.port))
        self.listener.listen(self.backlog)
        return True

    def keep_backlog(self) -> int | None:
        """An app may listen() on the socket again with a backlog of 1 (connections then dropped under any load,
        after the app is gone too): the socket's own given back. The backlog it found if it had to, else None."""
        if self.listener.fileno() < 0 or (found := listen_backlog(self.listener)) is None or found >= self.backlog:
            return None
        self.listener.listen(self.backlog)
        return found


def _split(n: int, seen: Mapping[Instance, int], opened: Mapping[Instance, int]) -> dict[Instance, int]:
    """n connections over the instances, in proportion to what each was seen taking (else to what each holds,
    else evenly); whole numbers that add up to n (largest remainder, ties to the first)."""
    if n <= 0 or not seen:
        return {}
    weights = dict(seen) if any(seen.values()) else dict(opened) if any(opened.values()) else dict.fromkeys(seen, 1)
    total = sum(weights.values())
    share = {inst: n * w // total for inst, w in weights.items()}
    rest = n - sum(share.values())
    for inst in sorted(weights, key=lambda i: -(n * weights[i] % total))[:rest]:
        share[inst] += 1
    return share
