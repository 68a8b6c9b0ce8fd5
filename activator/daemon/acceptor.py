"""Accepting on a socket shared with untrusted apps (handoff.py), in a thread of its own: never on the event loop.

A handoff service's listening socket is one open file description held by the activator and by every app it was
put into, so its status flags are the apps' too. An app can clear O_NONBLOCK at any moment, including between
the activator's check of the flags (or its own F_SETFL) and its accept(): an app that parks its descriptor in an
SCM_RIGHTS message looks as if it closed the socket, lets the activator take over, then takes it back and makes
it blocking. An accept() on the event loop would then wait for the next connection with every service, the control
socket and the agent stopped. Nothing in accept(2) makes one call non-blocking whatever the file says (unlike
MSG_DONTWAIT for recv), a dup() shares the description, and SO_RCVTIMEO is as shared as the flags; a second socket
in a SO_REUSEPORT group would give the apps SO_ATTACH_REUSEPORT_CBPF over the activator's connections, and does not
fit sockets systemd passes in.

So the only accept() is in this thread, which may block: it then waits for the next connection to that one
service, and the event loop never notices. The thread polls before each accept (a socket left blocking by the
last app seldom makes the second accept of a burst wait) and hands each connection to the loop as it takes it:
an app can take the connection the poll saw before this thread's accept() does, which then waits for the next
one, and a connection kept back until the burst ended would wait with it, unanswered. After a burst it waits
until the loop has taken them all (the kernel's accept queue, not memory, holds the rest). A connection taken
while the activator was not to accept (it was blocked in accept() when an app started) is served like any
connection the activator holds: passed on to the app (proxy.connect_handed). The thread has its own duplicate of
the descriptor, so the loop closing its own can never make it accept on a reused number; it ends on close(), at
its next wake-up: a wake pipe while it polls; while it accepts, a connection close() makes (close() sees
`in_accept`, or the thread sees `_closed` before it calls accept(): each writes its own flag before it reads the
other's) or a shutdown.

A connection inherits the listener's socket options, which an app sets for every holder. Those that reach the
event loop (every service) are put back on each connection taken here, before the loop sees it (RESET): SO_LINGER
(close() waits until the unsent data is gone or the linger time is over, up to hours, O_NONBLOCK or not), TX
timestamps (each write queues a message on the error queue, which libuv never reads: EPOLLERR for good, the loop
spins), and the rest of what fills the error queue or holds back readiness. What is queued already is drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import select
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Callable

from .sockets import address_of

log = logging.getLogger("activator")

#: at most this many accepts in a burst, each handed to the loop at once; then the thread waits until the loop has
#: taken them (back-pressure: the kernel's accept queue holds the rest)
ACCEPT_BURST = 64
#: after an error such as EMFILE, how long the thread waits before it tries again, seconds
ERROR_PAUSE = 0.1
#: an accept() that took longer than this waited for a connection, seconds (metrics and tests only)
WAITED = 0.005
#: while the socket does not listen (shut down), how often the thread looks whether someone made it listen again, ms
DEAF_CHECK_MS = 250

#: struct linger {l_onoff = 0}: close() returns at once, whatever the listener said
NO_LINGER = struct.pack("ii", 0, 0)
# Python's socket module names none of these (asm-generic/socket.h; the _NEW variants set the same flags)
SO_TIMESTAMP, SO_TIMESTAMPNS, SO_TIMESTAMPING, SO_ZEROCOPY = 29, 35, 37, 60
IP_RECVERR, IPV6_RECVERR = 11, 25
#: (level, option, value, families) each connection taken gets, whatever it inherited from the listener
RESET: tuple[tuple[int, int, int | bytes, tuple[int, ...]], ...] = (
    (socket.SOL_SOCKET, socket.SO_LINGER, NO_LINGER, (socket.AF_INET, socket.AF_INET6)),
    (socket.SOL_SOCKET, SO_TIMESTAMPING, 0, (socket.AF_INET, socket.AF_INET6)),
    (socket.SOL_SOCKET, SO_TIMESTAMP, 0, (socket.AF_INET, socket.AF_INET6)),  # clears SO_TIMESTAMPNS's too
    (socket.SOL_SOCKET, SO_ZEROCOPY, 0, (socket.AF_INET, socket.AF_INET6)),
    (socket.IPPROTO_IP, IP_RECVERR, 0, (socket.AF_INET, socket.AF_INET6)),
    (socket.IPPROTO_IPV6, IPV6_RECVERR, 0, (socket.AF_INET6,)),
    (socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1, (socket.AF_INET, socket.AF_INET6)),  # readable at the first byte
    (socket.IPPROTO_TCP, socket.TCP_NOTSENT_LOWAT, 0, (socket.AF_INET, socket.AF_INET6)),  # 0: the host's own
)
#: error-queue messages drained from a connection taken, at most (an app's TX timestamps from before the reset)
ERRQUEUE_DRAIN = 64

#: told on the loop why the socket cannot be accepted on
Problem = Callable[[str], None]


class Acceptor:
    """One thread accepting on one listening socket while `on`, handing connections to `deliver` on the loop."""

    def __init__(self, name: str, sock: socket.socket, deliver: Callable[[socket.socket], None],
                 problem: Problem) -> None:
        self.name = name
        self.sock = sock
        self.address = address_of(sock)
        self._deliver = deliver
        self._problem = problem
        self._loop = asyncio.get_running_loop()
        # Its own descriptor, wrapped without touching the flags (setblocking() would set the apps' too)
        self._sock = socket.socket(fileno=os.dup(sock.fileno()))
        self._fd = self._sock.fileno()
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        # The thread closes the pipe as it ends; a wake after that must not write to the number, which may be
        # another file's by then.
        self._pipe_lock = threading.Lock()
        self._pipe_open = True
        self._on = False
        self._closed = False
        self._deaf = False  # accept() said EINVAL (shut down): waits until it listens again
        # Accepted on the thread, not yet delivered on the loop. One _hand takes all that is queued, so a burst
        # costs the loop one wake-up, not one per connection. Under _ready_lock: `_scheduled` means a _hand is
        # queued that has not taken `_ready` yet (so it clears it before delivering, and a _push after that
        # schedules another); `_drained` is set when `_ready` is empty and no _hand is pending, or on close().
        self._ready: deque[socket.socket] = deque()
        self._ready_lock = threading.Lock()
        self._scheduled = False
        self._drained = threading.Event()
        self.in_accept = False  # inside accept(), where only a connection or a shutdown wakes it
        self.waits = 0  # accept() calls that waited (an app took the connection first, the socket was blocking)
        self._thread = threading.Thread(target=self._run, name=f"accept:{name}", daemon=True)
        self._thread.start()

    def set(self, on: bool) -> None:
        if on != self._on:
            self._on = on
            self._wake()

    def kick(self) -> None:
        """The socket listens again (after a shutdown): accept again now (the thread also looks by itself, in case
        an app made it listen)."""
        self._deaf = False
        self._wake()

    def close(self) -> None:
        """Stop for good. The thread closes its descriptor as it ends: at once if it polls; if it is inside
        accept() (the socket made blocking by an app), with the connection made here to wake it."""
        if self._closed:
            return
        self._closed = True
        self._wake()
        self._drained.set()
        if self.in_accept:
            self._poke()

    def _poke(self) -> None:
        family = socket.AF_INET6 if ":" in self.address.host else socket.AF_INET
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(self.address.host, self.address.host)
        with contextlib.suppress(OSError), socket.socket(family, socket.SOCK_STREAM) as s:
            s.setblocking(False)
            s.connect_ex((host, self.address.port))  # loopback: the handshake is done before this returns

    def _wake(self) -> None:
        with self._pipe_lock, contextlib.suppress(OSError):
            if self._pipe_open:
                os.write(self._wake_w, b"x")

    def _tell(self, fn: Callable[..., None], *args: object) -> bool:
        try:
            self._loop.call_soon_threadsafe(fn, *args)
            return True
        except RuntimeError:  # the loop is closed: the daemon is going
            self._closed = True
            return False

    # --- the thread --------------------------------------------------------------------------------------------

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._wake_r, select.POLLIN)
        listening = False
        try:
            while not self._closed:
                want = self._on and not self._deaf
                if want != listening:
                    if want:
                        poller.register(self._fd, select.POLLIN)
                    else:
                        poller.unregister(self._fd)
                    listening = want
                events = dict(poller.poll(DEAF_CHECK_MS if self._deaf else None))
                if self._deaf and self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    self._deaf = False
                if events.get(self._wake_r):
                    with contextlib.suppress(OSError):
                        os.read(self._wake_r, 4096)
                    continue
                if listening and events.get(self._fd):
                    self._burst()
        finally:
            self._sock.close()
            with self._pipe_lock:
                self._pipe_open = False
                os.close(self._wake_r)
                os.close(self._wake_w)

    def _burst(self) -> None:
        """Accept what is queued, handing each connection to the loop as it is taken."""
        taken = 0
        probe = select.poll()
        probe.register(self._fd, select.POLLIN)
        for _ in range(ACCEPT_BURST):
            if taken and not probe.poll(0):  # nothing more queued: an accept() now could wait
                break
            self.in_accept = True
            if self._closed:  # close() may have looked at in_accept before it was set, and not woken us
                self.in_accept = False
                break
            t0 = time.monotonic()
            try:
                conn, _addr = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                break
            except OSError as e:
                if e.errno == errno.EBADF:
                    self._closed = True
                elif e.errno == errno.EINVAL:  # not listening (an app shut it down): readable for ever
                    self._deaf = True
                    self._tell(self._problem, "no longer listens")
                else:  # EMFILE and the like: the next readiness tries again, a little later
                    self._tell(self._problem, f"accepting failed: {e.strerror}")
                    threading.Event().wait(ERROR_PAUSE)
                break
            finally:
                self.in_accept = False
                if time.monotonic() - t0 > WAITED:
                    self.waits += 1
            try:
                conn.setblocking(False)
                reset(conn)
            except OSError:  # never seen; a connection still set as an app said is never handed to the loop
                conn.close()
                continue
            taken += 1
            if not self._push(conn):
                return
        if taken and not self._closed:
            self._drained.wait()

    def _push(self, conn: socket.socket) -> bool:
        """Queue one connection for the loop, scheduling a _hand unless one is pending; False once the loop is
        gone (what is queued is closed)."""
        with self._ready_lock:
            self._ready.append(conn)
            self._drained.clear()
            if self._scheduled:
                return True
            self._scheduled = True
        if self._tell(self._hand):
            return True
        with self._ready_lock:
            while self._ready:
                self._ready.popleft().close()
        self._drained.set()
        return False

    def _hand(self) -> None:
        """On the loop: deliver everything queued so far."""
        with self._ready_lock:
            conns = list(self._ready)
            self._ready.clear()
            self._scheduled = False
        try:
            for i, conn in enumerate(conns):
                if self._closed:
                    conn.close()
                    continue
                try:
                    self._deliver(conn)
                except BaseException:  # a bug: it reaches the loop's handler, and nothing taken is left open
                    for rest in conns[i:]:
                        rest.close()
                    raise
        finally:
            with self._ready_lock:
                if not self._ready:
                    self._drained.set()


def reset(conn: socket.socket) -> None:
    """Put back what a connection inherited from a listener an app had its hands on (RESET), and drain its error
    queue. Non-blocking already."""
    for level, option, value, families in RESET:
        if conn.family in families:
            try:
                conn.setsockopt(level, option, value)
            except OSError as e:
                if e.errno != errno.ENOPROTOOPT:  # an option this kernel lacks, no app could have set either
                    raise
    for _ in range(ERRQUEUE_DRAIN):
        try:
            conn.recvmsg(1, 512, socket.MSG_ERRQUEUE)
        except BlockingIOError:
            return
