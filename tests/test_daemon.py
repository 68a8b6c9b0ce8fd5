"""The daemon as systemd and an operator meet it: kill -9 recovery, socket handoff across restarts, sd_notify
and the watchdog, `status` over the control socket, `inspect`. Each runs `activator run` as a real process."""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import pytest

from .conftest import ECHO, host_resources, write_config

pytestmark = pytest.mark.engine

ACTIVATOR = [sys.executable, "-m", "activator"]
HOME_NETNS = set(host_resources(Path("/nonexistent"))["netns"])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


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
           ready_lines: int = 1, kick: Callable[[], object] | None = None) -> Iterator[subprocess.Popen[str]]:
    """Run `activator run`, wait for its ready announcements; SIGKILL it if the test leaves it running.

    kick runs right after the process starts: systemd-socket-activate only execs the daemon on a connection.
    """
    with open(log, "a") as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, pass_fds=fds,
                                env=env or dict(os.environ))
    try:
        if kick is not None:
            kick()
        assert proc.stdout is not None
        deadline = time.monotonic() + 120
        seen = 0
        while seen < ready_lines:
            readable, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
            line = proc.stdout.readline() if readable else ""
            assert line, f"not ready: {log.read_text()[-2000:]}"
            seen += " ready on " in line
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


def test_kill_9_then_restart_cleans_every_orphan(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}})
    state, log = tmp_path / "state", tmp_path / "activator.log"
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        assert echo_once(port, b"first life") == b"first life"
        proc.kill()  # SIGKILL: no chance to clean up
        proc.wait()
    orphans = host_resources(state)
    assert len(orphans["runc"]) == 1 and orphans["mounts"] and len(orphans["dirs"]) == 1
    (name,) = orphans["runc"]
    assert f"activator-{name}" in orphans["netns"]
    assert any(c.endswith(f"/activator/{name}") for c in orphans["cgroups"])
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        assert "cleaned up after a previous run" in log.read_text()
        left = host_resources(state)
        assert name not in left["runc"] and f"activator-{name}" not in left["netns"] and not left["dirs"]
        assert not [c for c in left["cgroups"] if c.endswith(f"/activator/{name}")]
        assert echo_once(port, b"second life") == b"second life"
        assert stop(proc) == 0
    res = host_resources(state)
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []
    assert set(res["netns"]) <= HOME_NETNS


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


def test_systemd_socket_activate_handoff_notify_and_watchdog(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}})
    notify = NotifyListener(tmp_path / "notify.sock")
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify.sock"), WATCHDOG_USEC="600000")
    cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "-E", "NOTIFY_SOCKET", "-E", "WATCHDOG_USEC",
           *ACTIVATOR, "run", "-c", str(cfg)]
    try:
        with ThreadPoolExecutor(max_workers=1) as pool:
            # systemd-socket-activate starts the daemon on the first connection; that one must be served too.
            futures = []
            kick = lambda: futures.append(pool.submit(echo_once, port, b"the first one", 120))  # noqa: E731
            with daemon(cmd, tmp_path / "activator.log", env=env, kick=kick) as proc:
                (first,) = futures
                assert first.result() == b"the first one"
                assert "using the socket passed in for 127.0.0.1:" in (tmp_path / "activator.log").read_text()
                assert echo_once(port, b"handed over") == b"handed over"
                time.sleep(1)  # long enough for a few watchdog periods
                assert stop(proc) == 0
    finally:
        notify.close()
    msgs = notify.messages
    assert "READY=1" in msgs and "STOPPING=1" in msgs
    assert msgs.index("READY=1") < msgs.index("STOPPING=1")
    assert msgs.count("WATCHDOG=1") >= 3
    assert any(m.startswith("EXTEND_TIMEOUT_USEC=") for m in msgs)


def test_restart_behind_a_held_socket_loses_no_connection(tmp_path: Path) -> None:
    """What activator.socket gives: the listening socket outlives the daemon, so the kernel queues meanwhile."""
    lsock = socket.socket()
    lsock.bind(("127.0.0.1", 0))
    lsock.listen(1024)
    port = lsock.getsockname()[1]
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}})
    fd = lsock.fileno()
    # systemd's socket unit, played by this test: fd 3, LISTEN_PID of the process that gets it.
    cmd = ["bash", "-c", f'exec 3<&{fd} {fd}<&-; export LISTEN_PID=$$ LISTEN_FDS=1; exec systemd-socket-activate "$@"',
           "sh", *ACTIVATOR, "run", "-c", str(cfg)]
    log = tmp_path / "activator.log"
    n = 60
    futures: list[Future[bytes]] = []

    def clients() -> None:  # one every 40 ms for ~2.4 s, across the restart
        for i in range(n):
            futures.append(pool.submit(echo_once, port, b"conn %d" % i, 60))
            time.sleep(0.04)

    with ThreadPoolExecutor(max_workers=n + 1) as pool:
        with daemon(cmd, log, fds=(fd,), kick=lambda: pool.submit(clients)) as first:
            while len(futures) < 10:
                time.sleep(0.01)
            assert stop(first) == 0
            stopped_at = len(futures)
        with daemon(cmd, log, fds=(fd,)) as second:
            assert len(futures) - stopped_at >= 3  # these arrived while no activator was running at all
            while len(futures) < n:
                time.sleep(0.05)
            results = [f.result() for f in futures]
            assert stop(second) == 0
    lsock.close()
    assert results == [b"conn %d" % i for i in range(n)]


def test_status_and_inspect(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}})
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], tmp_path / "activator.log") as proc:
        with socket.create_connection(("127.0.0.1", port), timeout=30) as held:
            held.sendall(b"x")
            assert held.recv(1) == b"x"
            out = subprocess.run([*ACTIVATOR, "status", "-c", str(cfg), "--json"], capture_output=True,
                                 text=True, timeout=30)
            assert out.returncode == 0, out.stderr
            st = json.loads(out.stdout)
            assert st["pid"] == proc.pid and st["ready"]
            (svc,) = st["services"]
            (inst,) = svc["instances"]
            assert svc["name"] == "echo" and svc["open_connections"] == 1 and inst["connections"] == 1
            assert inst["how"] == "restore" and inst["start_ms"] > 0 and svc["checkpoint"]["pages_bytes"] > 0
            text = subprocess.run([*ACTIVATOR, "status", "-c", str(cfg)], capture_output=True, text=True,
                                  timeout=30).stdout
            assert "echo  on 127.0.0.1:" in text and inst["name"] in text and "restore" in text
        ins = subprocess.run([*ACTIVATOR, "inspect", "echo", "-c", str(cfg)], capture_output=True, text=True,
                             timeout=30)
        assert ins.returncode == 0, ins.stderr
        assert "listening  9000" in ins.stdout and "echo-server" in ins.stdout
        assert "matches the service definition" in ins.stdout and "CRIU 4." in ins.stdout
        rebuilt = subprocess.run([*ACTIVATOR, "checkpoint", "echo", "--rebuild", "-c", str(cfg)], capture_output=True,
                                 text=True, timeout=120)
        assert rebuilt.returncode == 0 and "rebuilt by the running activator" in rebuilt.stdout, rebuilt.stderr
        assert echo_once(port, b"after the rebuild") == b"after the rebuild"
        # Only root may ask the daemon (the config itself is readable to all here; the socket is not).
        public = Path(tempfile.mkdtemp(prefix="activator-status-"))
        public.chmod(0o755)
        shutil.copyfile(cfg, public / "services.yaml")
        (public / "services.yaml").chmod(0o644)
        nobody = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *ACTIVATOR,
                                 "status", "-c", str(public / "services.yaml")], capture_output=True, text=True,
                                timeout=30, cwd="/",
                                env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[1])))
        shutil.rmtree(public)
        assert nobody.returncode == 1 and "root only" in nobody.stderr and "Traceback" not in nobody.stderr
        assert stop(proc) == 0
    gone = subprocess.run([*ACTIVATOR, "status", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "no activator is running" in gone.stderr


def test_the_units_hardening_lets_runc_and_criu_work(tmp_path: Path) -> None:
    unit = (Path(__file__).resolve().parents[1] / "systemd" / "activator.service").read_text()
    (line,) = [ln for ln in unit.splitlines() if ln.startswith("CapabilityBoundingSet=~")]
    dropped = ",".join("-" + c.removeprefix("CAP_").lower() for c in line.split("~", 1)[1].split())
    nnp = ["--no-new-privs"] if "\nNoNewPrivileges=yes\n" in unit else []
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}})
    # Checkpoint and restore both happen under the reduced set, as they would under systemd.
    with daemon(["setpriv", *nnp, f"--bounding-set={dropped}", "--", *ACTIVATOR, "run", "-c", str(cfg)],
                tmp_path / "activator.log") as proc:
        status = Path(f"/proc/{proc.pid}/status").read_text()  # setpriv exec'd the daemon: same PID
        assert ("NoNewPrivs:\t1" in status) == bool(nnp)
        assert echo_once(port, b"restored with fewer capabilities") == b"restored with fewer capabilities"
        assert stop(proc) == 0
    assert "restore failed" not in (tmp_path / "activator.log").read_text()
