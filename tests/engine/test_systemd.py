"""The daemon as systemd meets it: socket handoff (LISTEN_FDS) with sd_notify and the watchdog, a restart behind
a held socket that loses no connection, and the unit's hardening under which checkpoint and restore still work."""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.conftest import ECHO, write_config
from tests.daemonproc import ACTIVATOR, NotifyListener, daemon, echo_once, free_port, stop

pytestmark = pytest.mark.engine



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
                deadline = time.monotonic() + 30
                while notify.messages.count("WATCHDOG=1") < 3:  # pinged every WATCHDOG_USEC/3 by the event loop
                    assert time.monotonic() < deadline, notify.messages
                    time.sleep(0.02)
                assert stop(proc) == 0
    finally:
        notify.close()
    msgs = notify.messages
    assert "READY=1" in msgs and "STOPPING=1" in msgs
    assert msgs.index("READY=1") < msgs.index("STOPPING=1")
    # what `systemctl status` shows while the first checkpoint is made, then what it serves
    assert msgs.index("STATUS=checkpoints: checking or building echo") < msgs.index("READY=1")
    assert msgs[msgs.index("READY=1") + 1] == "STATUS=serving 1 service(s)"
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
    with ThreadPoolExecutor(max_workers=40) as pool:
        first_batch = [pool.submit(echo_once, port, b"first %d" % i, 60) for i in range(10)]
        with daemon(cmd, log, fds=(fd,)) as first:
            assert [f.result() for f in first_batch] == [b"first %d" % i for i in range(10)]
            assert stop(first) == 0
        # No activator runs now: these connect into the held socket's queue and must wait, not be refused.
        between = [pool.submit(echo_once, port, b"between %d" % i, 60) for i in range(20)]
        deadline = time.monotonic() + 10
        while _queued(port) < 20:
            assert time.monotonic() < deadline, "the clients never queued on the held socket"
            time.sleep(0.01)
        assert not any(f.done() for f in between)
        with daemon(cmd, log, fds=(fd,)) as second:
            after = [pool.submit(echo_once, port, b"after %d" % i, 60) for i in range(10)]
            results = [f.result() for f in between + after]
            assert stop(second) == 0
    lsock.close()
    assert results == [b"between %d" % i for i in range(20)] + [b"after %d" % i for i in range(10)]


def _queued(port: int) -> int:
    """Connections waiting in the accept queue of the listener on port (ss: Recv-Q of a LISTEN socket)."""
    out = subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout.split()
    return int(out[1]) if len(out) > 1 else 0


def test_the_units_hardening_lets_runc_and_criu_work(tmp_path: Path) -> None:
    unit = (Path(__file__).resolve().parents[2] / "systemd" / "activator.service").read_text()
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



def test_listen_systemd_takes_the_socket_by_its_file_descriptor_name(tmp_path: Path) -> None:
    """FileDescriptorName= matching: the config says `listen: systemd`, the address lives only in the socket unit
    (played by systemd-socket-activate --fdname)."""
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": "systemd"}})
    cmd = ["systemd-socket-activate", "-l", f"127.0.0.1:{port}", "--fdname=echo", *ACTIVATOR, "run", "-c", str(cfg)]
    with ThreadPoolExecutor(max_workers=1) as pool:
        futures = []
        kick = lambda: futures.append(pool.submit(echo_once, port, b"by name", 120))  # noqa: E731
        with daemon(cmd, tmp_path / "activator.log", kick=kick) as proc:
            assert futures[0].result() == b"by name"
            log = (tmp_path / "activator.log").read_text()
            assert f"using the socket systemd passed in as 'echo' (127.0.0.1:{port})" in log
            assert f"echo serving on 127.0.0.1:{port}" in log  # the socket's address, in the ready line
            assert stop(proc) == 0
    # without the named socket: one line saying what to add to the socket unit
    out = subprocess.run([*ACTIVATOR, "run", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "FileDescriptorName=echo" in out.stderr.splitlines()[-1]


def test_instances_live_in_the_units_cgroup(tmp_path: Path) -> None:
    """As a systemd service (INVOCATION_ID, a .service cgroup, as Delegate=yes gives it in every hierarchy),
    instance cgroups go below the unit's own: systemd counts them and stopping the unit kills what is left.
    The unit's cgroup is made here by hand, with no systemd running."""
    import sys

    from activator.runtime import cgroups

    root = Path("/sys/fs/cgroup")
    unit = f"test.slice/activator-test-{os.getpid()}.service"
    hierarchies = cgroups.hierarchies()
    for h in hierarchies:
        (h / unit).mkdir(parents=True, exist_ok=True)
        if h.name == "cpuset":
            for d in (h / "test.slice", h / unit):
                for f in ("cpuset.cpus", "cpuset.mems"):
                    if not (d / f).read_text().strip():
                        (d / f).write_text((d.parent / f).read_text())
    procs = ",".join(str(h / unit / "cgroup.procs") for h in hierarchies)
    enter = ("import os, sys\nfor f in sys.argv[1].split(','):\n    open(f, 'w').write(str(os.getpid()))\n"
             "os.execv(sys.argv[2], sys.argv[2:])")
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}})
    env = dict(os.environ, INVOCATION_ID="0123456789abcdef")
    try:
        with daemon([sys.executable, "-c", enter, procs, *ACTIVATOR, "run", "-c", str(cfg)],
                    tmp_path / "activator.log", env=env) as proc:
            assert echo_once(port, b"in the unit") == b"in the unit"
            log = (tmp_path / "activator.log").read_text()
            assert f"instance cgroups under this unit's own: /{unit}/instances" in log
            # v1: systemd's own hierarchy names the unit; v2: the one hierarchy, where the daemon itself must
            # have left the unit's cgroup for a leaf ("no internal processes") before instances went below it
            top = root if cgroups.unified() else root / "systemd"
            mine = [p for p in (top / unit / "instances").iterdir() if p.is_dir()]
            assert mine and any((p / "cgroup.procs").read_text().split() for p in mine)  # the app runs in there
            legacy = [root / "activator"] if cgroups.unified() else list(root.glob("*/activator"))
            assert not [p for d in legacy if d.is_dir() for p in d.iterdir() if p.name in {m.name for m in mine}]
            if cgroups.unified():
                assert (root / unit / "cgroup.procs").read_text().split() == []
                assert str(proc.pid) in (root / unit / cgroups.DAEMON_LEAF / "cgroup.procs").read_text().split()
                on = (root / unit / "cgroup.subtree_control").read_text().split()
                assert {"memory", "pids"} <= set(on), on
                assert any((p / "memory.current").exists() for p in mine)
            assert stop(proc) == 0
        assert not [p for h in hierarchies for p in (h / unit / "instances").glob("*") if p.is_dir()]
    finally:
        for h in hierarchies:
            for d in (h / unit / "instances", h / unit / cgroups.DAEMON_LEAF, h / unit, h / "test.slice"):
                with contextlib.suppress(OSError):
                    d.rmdir()
