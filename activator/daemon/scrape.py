"""The metrics endpoint: Prometheus scrapes it, and any local user can connect to it.

prometheus_client's own server starts a thread per connection and waits on each without a timeout, so a local
user holding a few thousand idle connections would exhaust the unit's pids limit, which instances share. This
one is a single thread with its own small event loop (off the serving loop, so a connection flood there does not
delay a scrape): at most MAX_CONNECTIONS at once (more are closed at once), a request head of at most MAX_HEAD
bytes read within TIMEOUT seconds, one answer per connection, and nothing kept between connections.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import threading

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

log = logging.getLogger("activator.scrape")

MAX_CONNECTIONS = 32
MAX_HEAD = 8192
TIMEOUT = 5.0


class ScrapeServer:
    """Serves GET /metrics (and /) from one registry on a socket bound by the caller."""

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self._port = port
        self._sock: socket.socket | None = None
        self._loop = asyncio.new_event_loop()
        self._open = 0
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="metrics", daemon=True)

    @classmethod
    def listen(cls, registry: CollectorRegistry, host: str, port: int) -> ScrapeServer:
        """Started from outside any event loop (blocking until it serves)."""
        server = cls(registry, host, port)
        server._begin()
        server._ready.wait(10)
        return server

    @property
    def name(self) -> str:
        return f"metrics endpoint {self.host}:{self._port}"

    @property
    def port(self) -> int:
        return int(self._sock.getsockname()[1]) if self._sock is not None else self._port

    async def start(self) -> None:
        self._begin()
        await asyncio.to_thread(self._ready.wait, 10)

    async def stop(self) -> None:
        await asyncio.to_thread(self.shutdown)

    def _begin(self) -> None:
        """Bind (OSError: the address is taken or not ours), then serve from the thread."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.listen(128)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._thread.start()

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(asyncio.start_server(self._handle, sock=self._sock,
                                                                    limit=MAX_HEAD))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()
            self._loop.run_until_complete(server.wait_closed())
            self._loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._open >= MAX_CONNECTIONS:
            writer.transport.abort()
            return
        self._open += 1
        try:
            await asyncio.wait_for(self._answer(reader, writer), TIMEOUT)
        except (TimeoutError, OSError, ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._open -= 1
            writer.transport.abort()  # answered or given up: nothing is kept, no lingering close

    async def _answer(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")  # LimitOverrunError past MAX_HEAD
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or parts[0] not in (b"GET", b"HEAD"):
            status, body, ctype = b"405 Method Not Allowed", b"GET /metrics\n", b"text/plain"
        elif parts[1].split(b"?", 1)[0] not in (b"/metrics", b"/"):
            status, body, ctype = b"404 Not Found", b"GET /metrics\n", b"text/plain"
        else:
            status, body, ctype = b"200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST.encode()
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + ctype + b"\r\nContent-Length: "
                     + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n"
                     + (body if parts[:1] != [b"HEAD"] else b""))
        await writer.drain()

    def shutdown(self) -> None:
        """Stop serving and close the socket; blocking, returns when the thread has ended."""
        if self._thread.is_alive():
            self._ready.wait(10)  # a stop before its server is up would end run_until_complete with an error
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
        elif self._thread.ident is None:  # never started
            self._loop.close()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
