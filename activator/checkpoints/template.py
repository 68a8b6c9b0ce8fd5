"""A template from start to ready to dump: started with its output copied to its log, then waited for until
its app listens on its port, answers readiness (an HTTP path, a command), has been warmed up and has answered the
probes' paths (recorded), with none of those connections left open for the dump to take.

Every long wait says it is still waiting every PROGRESS_EVERY seconds, so a slow build is never silent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from pathlib import Path
from typing import Any

from activator.config.probes import probe_paths
from activator.config.service import ServiceConfig
from activator.core import probes
from activator.errors import StartError
from activator.runtime import readiness
from activator.runtime.sandbox import Sandbox
from activator.statedir import open_private
from activator.tasks import spawn

# Builds log under one name wherever their code lives (operators grep for it).
log = logging.getLogger("activator.builder")
#: one read of the template's output pipe, bytes
CHUNK = 65536
#: at most this much of what is still in the pipe is taken when the copier is closed, bytes
DRAIN_LIMIT = 1 << 20
#: how often a long wait during a build says it is still waiting (a JVM can take a minute to listen)
PROGRESS_EVERY = 10.0
PROBE_CLOSE_TIMEOUT = 10.0


@contextlib.asynccontextmanager
async def _still_waiting(service: str, what: str, budget: float) -> Any:
    """Log every PROGRESS_EVERY seconds while the body runs, so a long build is never silent."""
    async def tick() -> None:
        t0 = time.monotonic()
        while True:
            await asyncio.sleep(PROGRESS_EVERY)
            log.info("service=%s still waiting %s (%.0fs of %gs)", service, what, time.monotonic() - t0, budget)

    ticker = spawn(tick(), name=f"progress:{service}")
    try:
        yield
    finally:
        ticker.cancel()


async def start_and_wait(svc: ServiceConfig, sandbox: Sandbox, output: Path, log_hint: Path
                         ) -> dict[str, probes.Answer]:
    """Start the template and wait until it is ready to dump (listening, readiness, warm-up); returns what it
    answered the probes' paths."""
    # The template's stdio must be a pipe: CRIU cannot dump a descriptor on a host file outside the
    # container, and runc hands pipes over to the restored instance's own stdio on restore.
    answers: dict[str, probes.Answer] = {}
    r, w = os.pipe()
    try:
        copier = OutputCopier(r, output)
    except BaseException:
        os.close(w)
        raise
    try:
        try:
            await sandbox.start(stdout=w, stderr=w)
        finally:
            os.close(w)
        budget = svc.readiness.timeout
        deadline = time.monotonic() + budget
        log.info("service=%s template started; waiting up to %gs for it to listen on port %d", svc.name,
                 budget, svc.port)
        async with _still_waiting(svc.name, f"for the app to listen on port {svc.port}", budget):
            problem = await sandbox.wait_listening(svc.port, budget, udp="tcp" not in svc.protocol)
        if problem is not None and problem.startswith("elsewhere:"):
            ports = problem.split(":", 1)[1]
            first = ports.split(",")[0]
            raise StartError(
                f"service '{svc.name}': the app listens on port {ports.replace(',', ', ')}, not on port "
                f"{svc.port}; set 'port: {first}' (or make the app listen on {svc.port})"
            )
        if problem == "exited":
            raise StartError(
                f"service '{svc.name}': the app exited before listening on port {svc.port}; "
                f"see {log_hint}"
            )
        if problem is not None:
            raise StartError(
                f"service '{svc.name}': the app did not listen on port {svc.port} within {budget:g}s; "
                f"check 'port' or raise 'readiness.timeout' (app output: {log_hint})"
            )
        pid = await sandbox.pid()
        if pid is None:
            raise StartError(f"service '{svc.name}': the app exited right after it started listening; "
                             f"see {log_hint}")
        warm = svc.warmup.http_paths or svc.warmup.payload is not None
        paths = probe_paths(svc.probes)
        if svc.readiness.http_path or svc.readiness.command or warm or paths:
            before = readiness.held_sockets(pid)
            if svc.readiness.http_path:
                await _wait_http(svc, sandbox, deadline)
            if svc.readiness.command:
                await _wait_command(svc, sandbox, deadline, pid, output, log_hint)
            if warm:
                await _warm_up(svc, sandbox)
            for path in paths:
                answers[path] = await _record_probe(svc, sandbox, path)
            # The dump should not capture these connections (they would come back closed, and they are
            # not the app's own); the app may close its end lazily, so wait for the descriptors to go.
            if not await readiness.wait_until(
                lambda: not readiness.stray_connections(pid, before), timeout=PROBE_CLOSE_TIMEOUT,
            ):
                raise StartError(
                    f"service '{svc.name}': the app kept the readiness or warm-up connections open for "
                    f"{PROBE_CLOSE_TIMEOUT:g}s after 'Connection: close'; drop 'readiness.http_path'/'warmup'"
                )
    except BaseException:
        # An app that exited has its output (flushed at exit) in the pipe still: read it to the end before the
        # log an error points to is kept; a live one is not waited for long.
        with contextlib.suppress(TimeoutError, asyncio.CancelledError):
            await asyncio.wait_for(asyncio.shield(copier.ended), 0.5)
        raise
    finally:
        copier.close()
    return answers

async def _record_probe(svc: ServiceConfig, sandbox: Sandbox, path: str) -> probes.Answer:
    """What the template answers a probe of path: what the activator answers it with while nothing runs."""
    raw = await readiness.http_fetch(sandbox.connector(svc.port), svc.port, path, probes.ANSWER_LIMIT)
    answer = probes.parse_answer(raw) if raw is not None else None
    if answer is None:
        raise StartError(f"service '{svc.name}': the template did not answer GET {path} (probes) with HTTP within "
                         "5s; fix the probe's http path or remove it")
    log.info("service=%s probe %s recorded: %d %s, %d bytes", svc.name, path, answer.status, answer.reason,
             len(answer.body))
    return answer

async def _warm_up(svc: ServiceConfig, sandbox: Sandbox) -> None:
    """svc.warmup against the template, one request at a time; failures are counted, not fatal (a warm-up is
    an optimisation), unless every single one failed (then the paths are wrong: say so)."""
    w = svc.warmup
    t0, ok, total = time.monotonic(), 0, 0
    connect = sandbox.connector(svc.port)

    for _ in range(w.count):
        for path in w.http_paths:
            total += 1
            ok += await readiness.http_ok(connect, svc.port, path)
        if w.payload is not None:
            total += 1
            ok += await readiness.exchange(connect, w.payload.encode())
    log.info("service=%s warmed up: %d of %d requests answered in %.1fs", svc.name, ok, total,
             time.monotonic() - t0)
    if total and not ok:
        raise StartError(f"service '{svc.name}': none of the {total} warm-up requests was answered; fix "
                         "'warmup' (paths, payload) or remove it")

async def _wait_http(svc: ServiceConfig, sandbox: Sandbox, deadline: float) -> None:
    path = svc.readiness.http_path
    assert path is not None
    connect = sandbox.connector(svc.port)

    while time.monotonic() < deadline:
        if await readiness.http_ok(connect, svc.port, path):
            return
        await asyncio.sleep(0.1)
    raise StartError(
        f"service '{svc.name}': GET {path} on port {svc.port} did not answer 2xx/3xx within "
        f"{svc.readiness.timeout:g}s; fix 'readiness.http_path' or raise 'readiness.timeout'"
    )

async def _wait_command(svc: ServiceConfig, sandbox: Sandbox, deadline: float, pid: int, output: Path,
                        log_hint: Path) -> None:
    """readiness.command in the template until it exits 0; what it printed goes to the template's log. Every
    run must be gone, with whatever it started, before the next (the dump takes every process along)."""
    command = svc.readiness.command
    assert command is not None
    args = ("/bin/sh", "-c", command[0]) if len(command) == 1 else command
    before = readiness.foreign(pid)
    status: int | None = None
    while time.monotonic() < deadline:
        out = os.open(output, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        try:
            status = await sandbox.probe(args, timeout=min(svc.readiness.command_timeout,
                                                           max(0.1, deadline - time.monotonic())), output=out)
        finally:
            os.close(out)
        if not await readiness.wait_until(lambda: readiness.foreign(pid) <= before, timeout=2):
            raise StartError(f"service '{svc.name}': readiness.command left processes running in the template "
                             f"({readiness.describe(readiness.foreign(pid) - before)}); make it wait for "
                             "what it starts")
        if status == 0:
            return
        await asyncio.sleep(0.25)
    said = "it timed out" if status is None else f"its last exit status was {status}"
    raise StartError(
        f"service '{svc.name}': readiness.command did not succeed within {svc.readiness.timeout:g}s ({said}; "
        f"its output is in {log_hint}); fix it or raise 'readiness.timeout'")


class OutputCopier:
    """The template's stdout and stderr, copied from the pipe's read end to its log as they arrive, until the app
    and everything that holds the pipe have exited (`ended`), or until close().

    The copier is the descriptor's only owner: the loop watches it (add_reader) and it is closed once, by close().
    A read-pipe transport would own it too, and uvloop closes a pipe transport's descriptor twice (libuv's close,
    then the file object's: MagicStack/uvloop#763), the second time when the number may already be another
    thread's file (a build's, or a Popen's exec-status pipe). Made and closed on the loop, with no task between
    the two that a cancel could skip."""

    def __init__(self, fd: int, dest: Path) -> None:
        self.dest = dest
        self.writable = True
        self._fd: int | None = fd
        self._loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[None] = self._loop.create_future()
        try:
            self._out = open_private(dest)
            os.set_blocking(fd, False)  # the read end only: the app's end is a file description of its own
            self._loop.add_reader(fd, self._readable)
        except BaseException:
            self._fd = None
            os.close(fd)
            raise

    def _readable(self) -> None:
        assert self._fd is not None
        try:
            chunk = os.read(self._fd, CHUNK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            chunk = b""
        if chunk:
            self.data_received(chunk)
            return
        self._loop.remove_reader(self._fd)
        if not self.ended.done():
            self.ended.set_result(None)

    def data_received(self, data: bytes) -> None:
        # Keep draining the pipe even when the log cannot be written (a full disk): an app blocked on a full
        # stdout pipe would never become ready.
        if not self.writable:
            return
        try:
            os.write(self._out, data)
        except OSError as e:
            self.writable = False
            log.warning("template output to %s stopped: %s", self.dest, e.strerror)

    def close(self) -> None:
        """Stop copying. What the app wrote that the loop has not read yet is taken too (up to DRAIN_LIMIT: this
        runs on the loop, and an app may write as fast as it is read), so the log an error points to has what
        the app said."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        self._loop.remove_reader(fd)
        taken = 0
        with contextlib.suppress(OSError):  # BlockingIOError: nothing left
            while taken < DRAIN_LIMIT and (chunk := os.read(fd, CHUNK)):
                self.data_received(chunk)
                taken += len(chunk)
        os.close(fd)
        os.close(self._out)
        if not self.ended.done():
            self.ended.set_result(None)
