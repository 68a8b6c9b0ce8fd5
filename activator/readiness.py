"""Is the app ready? Answered from /proc, without opening connections.

A checkpoint must not contain an established TCP connection (CRIU refuses to restore "Connected TCP socket in
image"), so the default readiness check never connects: it reads the kernel's socket table for the
container's network namespace and waits for a LISTEN socket on the service's port. The optional HTTP check
does connect, and is followed by a wait until no connection to the port is left in the table.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

TCP_LISTEN = 0x0A
TCP_TIME_WAIT = 0x06
POLL_INTERVAL = 0.01


def socket_table(pid: int) -> list[tuple[int, int]]:
    """(local port, state) of every TCP socket in pid's network namespace."""
    rows: list[tuple[int, int]] = []
    for name in ("tcp", "tcp6"):
        try:
            lines = Path(f"/proc/{pid}/net/{name}").read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if len(fields) > 3:
                rows.append((int(fields[1].rsplit(":", 1)[1], 16), int(fields[3], 16)))
    return rows


def is_listening(pid: int, port: int) -> bool:
    return any(p == port and st == TCP_LISTEN for p, st in socket_table(pid))


def open_connections(pid: int, port: int) -> int:
    """Connections on the app's port that a dump would capture (TIME_WAIT belongs to no process)."""
    return sum(1 for p, st in socket_table(pid) if p == port and st not in (TCP_LISTEN, TCP_TIME_WAIT))


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


async def http_ok(
    connect: Callable[[], Awaitable[tuple[asyncio.StreamReader, asyncio.StreamWriter]]], port: int, path: str,
) -> bool:
    """One GET with Connection: close; True for a 2xx/3xx status. The connection is fully closed on return."""
    try:
        reader, writer = await connect()
    except OSError:
        return False
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: localhost:{port}\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        status = await asyncio.wait_for(reader.readline(), 5)
        parts = status.split()
        ok = len(parts) >= 2 and parts[1][:1] in (b"2", b"3")
        # Read to EOF so the server closes its side first: its socket must be gone before a dump.
        await asyncio.wait_for(reader.read(), 5)
        return ok
    except (OSError, TimeoutError, asyncio.IncompleteReadError):
        return False
    finally:
        writer.close()
        try:
            await writer.wait_closed()
        except OSError:
            pass
