"""Helpers for tests that run `activator run` as a real process: start it and wait for its ready lines,
stop it, talk to it, and play systemd's side of sd_notify."""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from .conftest import free_port, host_resources

ACTIVATOR = [sys.executable, "-m", "activator"]
HOME_NETNS = set(host_resources(Path("/nonexistent"))["netns"])

__all__ = ["ACTIVATOR", "HOME_NETNS", "NotifyListener", "daemon", "echo_once", "free_port", "stop"]



def echo_once(port: int, payload: bytes, timeout: float = 30) -> bytes:
    deadline = time.monotonic() + 10
    while True:  # a listener that is about to exist (a process just started) may refuse for a moment
        try:
            c = socket.create_connection(("127.0.0.1", port), timeout=timeout)
            break
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.02)
    with c:
        c.sendall(payload)
        c.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := c.recv(65536):
            got += chunk
    return got


@contextmanager
def daemon(cmd: list[str], log: Path, *, env: dict[str, str] | None = None, fds: tuple[int, ...] = (),
           ready_lines: int = 1, kick: Callable[[], object] | None = None,
           preexec: Callable[[], None] | None = None) -> Iterator[subprocess.Popen[str]]:
    """Run `activator run`, wait for its ready announcements; SIGKILL it if the test leaves it running.

    kick runs right after the process starts: systemd-socket-activate only execs the daemon on a connection.
    """
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, pass_fds=fds,
                                env=env or dict(os.environ), preexec_fn=preexec)
    try:
        if kick is not None:
            kick()
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        out = ""
        # The raw descriptor, not readline(): a buffered reader may hold the next line where select() cannot see it.
        fd = proc.stdout.fileno()
        while out.count(" ready on ") < ready_lines:
            readable, _, _ = select.select([fd], [], [], max(0.0, deadline - time.monotonic()))
            chunk = os.read(fd, 65536).decode() if readable else ""
            assert chunk, f"not ready: {log.read_text()[-2000:]}"
            out += chunk
        yield proc
    finally:
        if proc.poll() is None:  # the test failed mid-way: do not leave its instances behind
            proc.kill()
            proc.wait()
            subprocess.run([*ACTIVATOR, "cleanup", "-c", cmd[cmd.index("-c") + 1]], capture_output=True, timeout=60)
        proc.wait()
        if proc.stdout:
            proc.stdout.close()


def stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=60)


class NotifyListener:
    """Plays systemd's side of sd_notify: a datagram socket collecting what the daemon reports."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[str] = []
        self._stop = False
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop:
            try:
                self.messages += self.sock.recv(4096).decode().split("\n")
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop = True
        self._thread.join()
        self.sock.close()

