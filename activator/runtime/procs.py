"""Starting helper processes (runc, CRIU) cheaply.

uvloop's subprocess support spawns through libuv, which fork()s the whole daemon: with a daemon of some size
that costs 5-10 ms per spawn, on the restore path every time. Python's own subprocess module uses vfork() when it
can (no preexec_fn), ~1 ms. So helpers are started with subprocess.Popen in a worker thread of a dedicated pool
(waiting for a helper occupies a thread; the pool is sized so that restores, bounded elsewhere, never queue on it).

Every helper runs in a session of its own, so giving up on one (a restore_timeout, a shutdown) kills it together
with whatever it started (runc's CRIU).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any


def start_time(pid: int) -> int | None:
    """A live (non-zombie) process's start time (clock ticks since boot, /proc/PID/stat field 22); None if it is
    gone. With the pid, it names one process: a pid alone may have been reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return None if fields[0] in ("Z", "X") else int(fields[19])


def socket_inodes(pid: int) -> set[int]:
    """The inodes of the sockets a process holds (its /proc/PID/fd links `socket:[N]`); empty if it is gone."""
    found: set[int] = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return found
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:  # closed meanwhile
            continue
        if link.startswith("socket:["):
            found.add(int(link[8:-1]))
    return found


def holds_socket(pid: int, inode: int) -> bool:
    return inode in socket_inodes(pid)


_pool = ThreadPoolExecutor(max_workers=32, thread_name_prefix="helper")


async def _in_pool(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.get_running_loop().run_in_executor(_pool, fn, *args)


class Helper:
    def __init__(self, popen: subprocess.Popen[bytes]) -> None:
        self.popen = popen
        self.pid = popen.pid

    @classmethod
    async def start(cls, args: Sequence[str], *, stdin: int | None = subprocess.DEVNULL,
                    stdout: int | None = subprocess.PIPE, stderr: int | None = subprocess.PIPE,
                    env: dict[str, str] | None = None, pass_fds: Sequence[int] = (),
                    preexec_fn: Callable[[], None] | None = None) -> Helper:
        spawning = asyncio.ensure_future(_in_pool(lambda: subprocess.Popen(
            list(args), stdin=stdin, stdout=stdout, stderr=stderr, env=env, pass_fds=tuple(pass_fds),
            start_new_session=True, preexec_fn=preexec_fn)))
        try:
            return cls(await asyncio.shield(spawning))
        except asyncio.CancelledError:
            # The thread goes on using the caller's descriptors until Popen returns, and the caller closes them
            # as soon as we are gone: wait for it, then kill what it started.
            await asyncio.wait([spawning])
            if not spawning.cancelled() and spawning.exception() is None:
                late = cls(spawning.result())
                late.kill()
                await _in_pool(late.popen.communicate)
            raise

    async def communicate(self) -> tuple[int, bytes, bytes]:
        """Wait for it to end; its return code and output. Cancelled: it and its session are killed first."""
        try:
            out, err = await asyncio.shield(_in_pool(self.popen.communicate))
        except BaseException:
            self.kill()
            with contextlib.suppress(Exception):
                await _in_pool(self.popen.wait)
            raise
        return self.popen.returncode, out or b"", err or b""

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)

    async def reap(self) -> None:
        await _in_pool(self.popen.wait)
