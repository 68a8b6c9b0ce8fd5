"""The control socket: how `activator status` reads the running daemon's own view, not files on disk.

A Unix stream socket at state_dir/control.sock, mode 0600 in a root-owned directory, and every peer's
credentials are checked (SO_PEERCRED) to be root besides. One request line in, one JSON document out, then
the connection closes. Requests: `status`, `rebuild SERVICE`, `reload`, `plan [FILE]`.

A daemon that is stopped (SIGSTOP) or wedged still accepts connections (the kernel queues them), so silence is
told apart from work: the daemon sends a newline as soon as it takes a connection and every KEEPALIVE seconds
while the request runs (a reload may build checkpoints for minutes). A client that hears nothing for
ANSWER_TIMEOUT seconds says so in one line, naming the daemon's PID.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import json
import logging
import os
import socket
import struct
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from activator.errors import ActivatorError

log = logging.getLogger("activator.control")


class NotRunning(ActivatorError):
    """Nothing answers on the control socket."""

MAX_REQUEST = 1024
KEEPALIVE = 1.0
ANSWER_TIMEOUT = 5.0


class ControlServer:
    def __init__(self, path: Path, handlers: dict[str, Callable[..., Any]]) -> None:
        self.path = path
        self.handlers = handlers
        self._server: asyncio.AbstractServer | None = None

    @property
    def name(self) -> str:
        return f"control socket {self.path}"

    async def start(self) -> None:
        # We hold the state dir's lock, so a socket file here is a dead run's: safe to replace.
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        old = os.umask(0o177)
        try:
            self._server = await asyncio.start_unix_server(self._handle, path=str(self.path))
        finally:
            os.umask(old)
        os.chmod(self.path, 0o600)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            sock = writer.get_extra_info("socket")
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
            _pid, uid, _gid = struct.unpack("3i", creds)
            if uid != 0:
                reply: Any = {"error": "the control socket is root only"}
            else:
                writer.write(b"\n")  # alive: the client's clock for an answer starts over
                line = (await asyncio.wait_for(reader.readline(), 5))[:MAX_REQUEST].decode(errors="replace")
                verb, *args = line.split() or [""]
                handler = self.handlers.get(verb)
                if handler is None:
                    reply = {"error": f"unknown request '{verb}'; known: {', '.join(self.handlers)}"}
                else:
                    reply = handler(*args)
                    if inspect.isawaitable(reply):
                        reply = await self._with_keepalive(reply, writer)
            writer.write(json.dumps(reply).encode() + b"\n")
            await writer.drain()
        except (OSError, TimeoutError) as e:
            log.debug("control connection: %s", e)
        except ActivatorError as e:
            writer.write(json.dumps({"error": str(e)}).encode() + b"\n")
            await writer.drain()
        finally:
            writer.close()

    @staticmethod
    async def _with_keepalive(work: Any, writer: asyncio.StreamWriter) -> Any:
        task = asyncio.ensure_future(work)
        try:
            while True:
                done, _ = await asyncio.wait({task}, timeout=KEEPALIVE)
                if done:
                    return task.result()
                writer.write(b"\n")
                await writer.drain()
        finally:
            if not task.done():  # the client went away: the request itself still finishes
                await asyncio.shield(task)

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


def request(path: Path, what: str, timeout: float = 10.0) -> Any:
    """Ask the daemon listening at path; a one-line ActivatorError if there is none, if it says nothing for
    ANSWER_TIMEOUT seconds (stopped or wedged), or if its answer takes longer than `timeout` in all."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(ANSWER_TIMEOUT)
        try:
            s.connect(str(path))
        except (FileNotFoundError, NotADirectoryError, ConnectionRefusedError):  # (state_dir under a file: none)
            raise NotRunning(
                f"no activator is running with this state_dir ({path} does not answer); start it with `activator run`"
            ) from None
        except PermissionError:
            raise ActivatorError(f"{path}: permission denied; the control socket is root only (try sudo)") from None
        except TimeoutError:
            raise ActivatorError(f"{path}: the daemon did not accept a connection within {ANSWER_TIMEOUT:g} s "
                                 "(stopped or overloaded?)") from None
        pid = struct.unpack("3i", s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        deadline = time.monotonic() + timeout
        data = b""
        try:
            s.sendall(what.encode() + b"\n")
            while chunk := s.recv(65536):
                data += chunk
                if time.monotonic() > deadline:
                    raise ActivatorError(f"{path}: the daemon at PID {pid} is still working on '{what.split()[0]}' "
                                         f"after {timeout:g} s; see its log")
        except TimeoutError:
            raise ActivatorError(f"{path}: the daemon at PID {pid} did not answer within {ANSWER_TIMEOUT:g} s "
                                 f"(stopped or wedged? `grep State /proc/{pid}/status`)") from None
    try:
        reply = json.loads(data.strip() or b"{}")
    except ValueError:
        raise ActivatorError(f"{path}: the daemon at PID {pid} answered something that is not JSON") from None
    if isinstance(reply, dict) and "error" in reply:
        raise ActivatorError(f"{path}: {reply['error']}")
    return reply
