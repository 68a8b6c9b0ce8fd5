"""Is the app ready? Answered from /proc, without opening connections.

A checkpoint must not contain an established TCP connection (CRIU refuses to restore "Connected TCP socket in
image"), so the default readiness check never connects: it reads the kernel's socket table for the
container's network namespace and waits for a LISTEN socket on the service's port. The optional HTTP check
does connect, and is followed by a wait until no connection to the port is left in the table.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

TCP_LISTEN = 0x0A
TCP_TIME_WAIT = 0x06
POLL_INTERVAL = 0.01
#: the most of a readiness answer read (and dropped) before the probe gives up on it
MAX_BODY = 16 << 20


def _tcp_rows(pid: int) -> list[list[str]]:
    """Rows of /proc/PID/net/tcp and tcp6: the TCP sockets of pid's network namespace."""
    rows: list[list[str]] = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        rows += [fields for line in lines if len(fields := line.split()) > 9]
    return rows


def udp_ports(pid: int) -> set[int]:
    """Local ports of the UDP sockets in pid's network namespace (a UDP server's is bound, never listening)."""
    ports: set[int] = set()
    for name in ("udp", "udp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        ports |= {int(f[1].rsplit(":", 1)[1], 16) for line in lines if len(f := line.split()) > 9}
    return ports


def socket_table(pid: int) -> list[tuple[int, int]]:
    """(local port, state) of every TCP socket in pid's network namespace."""
    return [(int(f[1].rsplit(":", 1)[1], 16), int(f[3], 16)) for f in _tcp_rows(pid)]


def listening_inodes(pid: int) -> set[int]:
    return {int(f[9]) for f in _tcp_rows(pid) if int(f[3], 16) == TCP_LISTEN}


def _pid_ns(pid: int | str) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/pid")
    except OSError:
        return None


def processes(init_pid: int) -> set[int]:
    """The pids (host view) of every process in init_pid's pid namespace."""
    ns = _pid_ns(init_pid)
    with os.scandir("/proc") as procs:
        return {int(e.name) for e in procs if e.name.isdigit() and _pid_ns(e.name) == ns}


def foreign(init_pid: int) -> set[int]:
    """The processes in init_pid's pid namespace that are not the app's: what a `runc exec` (a readiness command)
    started and left behind. The app's are init_pid and, recursively, the children of the app's processes that
    are in their parent's session or lead a session of their own (PostgreSQL makes each backend a session leader).
    runc exec gives its process a session of its own: what it leaves, reparented to init_pid, is in that session,
    which is neither init_pid's nor its own. (One of its processes that makes itself a session leader and outlives
    it passes for the app's.)"""
    procs = {p: st for p in processes(init_pid) if (st := _stat(p)) is not None}
    app = {init_pid}
    grew = True
    while grew:
        grew = False
        for p, (ppid, sid) in procs.items():
            if p not in app and ppid in app and sid in (procs.get(ppid, (0, -1))[1], p):
                app.add(p)
                grew = True
    return set(procs) - app


def describe(pids: set[int]) -> str:
    """'PID COMMAND, ...' for a message (a process gone meanwhile is named by its pid alone)."""
    def comm(pid: int) -> str:
        try:
            return f"{pid} {Path(f'/proc/{pid}/comm').read_text().strip()}"
        except OSError:
            return str(pid)
    return ", ".join(comm(p) for p in sorted(pids))


def _stat(pid: int) -> tuple[int, int] | None:
    """(parent pid, session id) of a process, host view; None once it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()  # after the command: state ppid pgrp session
    return int(fields[1]), int(fields[3])


def held_sockets(init_pid: int) -> set[int]:
    """Socket inodes held open by any process in init_pid's pid namespace (the whole container)."""
    ns = _pid_ns(init_pid)
    held: set[int] = set()
    with os.scandir("/proc") as procs:
        for entry in procs:
            if entry.name.isdigit() and _pid_ns(entry.name) == ns:
                held |= _socket_fds(entry.name)
    return held


def _socket_fds(pid: str) -> set[int]:
    found: set[int] = set()
    # The process may exit while we look: the scandir is closed however the walk ends.
    with contextlib.suppress(OSError), os.scandir(f"/proc/{pid}/fd") as fds:
        for fd in fds:
            with contextlib.suppress(OSError):
                target = os.readlink(fd.path)
                if target.startswith("socket:["):
                    found.add(int(target[8:-1]))
    return found


def stray_connections(init_pid: int, before: set[int]) -> set[int]:
    """Sockets the container opened since `before` that are not listeners: what a probe may have left.

    A socket the app has not close()d yet can already be in TCP state CLOSE, which /proc/net/tcp no longer
    lists, so this looks at the descriptors themselves.
    """
    return held_sockets(init_pid) - before - listening_inodes(init_pid)


def is_listening(pid: int, port: int) -> bool:
    return any(p == port and st == TCP_LISTEN for p, st in socket_table(pid))


async def wait_until(
    check: Callable[[], bool], *, timeout: float, alive: Callable[[], Awaitable[bool]] | None = None,
) -> bool:
    """Poll check() until true (True), the deadline (False) or alive() turning false (False)."""
    deadline = time.monotonic() + timeout
    last_alive_check = 0.0
    while True:
        if check():
            return True
        now = time.monotonic()
        if now >= deadline:
            return False
        if alive is not None and now - last_alive_check > 0.2:
            last_alive_check = now
            if not await alive():
                return False
        await asyncio.sleep(POLL_INTERVAL)


Connect = Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]]


async def _conversation(connect: Connect, talk: Callable[[asyncio.StreamReader, asyncio.StreamWriter],
                                                         Awaitable[bool]]) -> bool:
    """Connect, run talk, close fully; False if the connection or the talk failed."""
    try:
        reader, writer = await connect()
    except OSError:
        return False
    try:
        return await talk(reader, writer)
    except (OSError, TimeoutError, ValueError, asyncio.IncompleteReadError):  # ValueError: a line or body too long
        return False
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def http_ok(connect: Connect, port: int, path: str, method: str = "GET", answer_within: float = 5) -> bool:
    """One request (GET, or a bodiless POST/PUT/DELETE) with Connection: close; True for a 2xx/3xx status line
    within answer_within seconds. The connection is fully closed on return."""
    body = "" if method == "GET" else "Content-Length: 0\r\n"

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(f"{method} {path} HTTP/1.1\r\nHost: localhost:{port}\r\n{body}Connection: close\r\n\r\n"
                     .encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), answer_within)  # at most the reader's limit (64 KiB)
        parts = status.split()
        ok = len(parts) >= 2 and parts[1][:1] in (b"2", b"3")
        # Read to EOF so the server closes its side first: its socket must be gone before a dump. What it sends
        # is the image's, untrusted: read and dropped in chunks, so a body without end costs no memory, and
        # given up after MAX_BODY bytes or 5 s.
        async def drain() -> None:
            left = MAX_BODY
            while chunk := await reader.read(65536):
                left -= len(chunk)
                if left < 0:
                    raise ValueError("answer too long")
        await asyncio.wait_for(drain(), 5)
        return ok

    return await _conversation(connect, talk)


async def http_fetch(connect: Connect, port: int, path: str, limit: int, within: float = 5) -> bytes | None:
    """One HTTP/1.0 GET (so the answer is neither chunked nor kept alive), read to its end or `limit` bytes
    within `within` seconds; None if it could not be made or did not end in time. The answer is the image's
    app's, untrusted: the caller parses it (core/probes.py)."""
    got = bytearray()

    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(f"GET {path} HTTP/1.0\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()

        async def read() -> None:
            while len(got) < limit and (chunk := await reader.read(65536)):
                got.extend(chunk)
        await asyncio.wait_for(read(), within)
        return True

    return bytes(got[:limit]) if await _conversation(connect, talk) else None


async def exchange(connect: Connect, payload: bytes) -> bool:
    """Send payload, wait for the first bytes of an answer, close. True if something came back."""
    async def talk(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bool:
        writer.write(payload)
        await writer.drain()
        return bool(await asyncio.wait_for(reader.read(65536), 5))

    return await _conversation(connect, talk)
