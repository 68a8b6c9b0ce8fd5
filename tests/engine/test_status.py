"""What an operator asks the running daemon: `status` over the root-only control socket, `inspect` of a
checkpoint, `checkpoint --rebuild` through the daemon."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ECHO, HTTPD, http_get, write_config
from tests.daemonproc import ACTIVATOR, daemon, echo_once, free_port, stop

pytestmark = pytest.mark.engine



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
            assert inst["memory_bytes"] > 0 and inst["cpu_seconds"] > 0 and svc["started_total"] == 1
            # The live view (issue 22 item 5): frames printed one after another when not on a terminal; the
            # second has rates (the first has no earlier answer to take them from).
            for verb in (["status", "--watch"], ["top"]):
                watch = subprocess.run([*ACTIVATOR, *verb, "--count", "2", "--interval", "0.3", "-c", str(cfg)],
                                       capture_output=True, text=True, timeout=30)
                assert watch.returncode == 0, watch.stderr
                frames = watch.stdout.split("activator pid ")[1:]
                assert len(frames) == 2 and "\x1b" not in watch.stdout, watch.stdout
                (row,) = [x for x in frames[1].splitlines() if x.startswith("echo ")]
                assert row.split()[1:6] == ["1/1", "0", "0", "1", "0.0"], row  # instances .. starts/s
                assert "iB" in row and row.rstrip().endswith("%"), row
                assert inst["name"] in frames[1] and "1 conns" in frames[1], frames[1]
            bad = subprocess.run([*ACTIVATOR, "top", "--interval", "0", "-c", str(cfg)], capture_output=True,
                                 text=True, timeout=30)
            assert bad.returncode == 2 and "between 0.1 and 3600" in bad.stderr, bad.stderr
        ins = subprocess.run([*ACTIVATOR, "inspect", "echo", "-c", str(cfg)], capture_output=True, text=True,
                             timeout=30)
        assert ins.returncode == 0, ins.stderr
        assert "listening  9000" in ins.stdout and "echo-server" in ins.stdout
        assert "matches the service definition" in ins.stdout and "CRIU 4." in ins.stdout
        assert "restores   by copy (restore_memory: copy)\n" in ins.stdout, ins.stdout
        # Where the pages are: every dumped page is put in exactly one mapping, and the app's binary is one.
        held = json.loads(subprocess.run([*ACTIVATOR, "inspect", "echo", "--json", "-c", str(cfg)],
                                         capture_output=True, text=True, timeout=30, check=True).stdout)
        assert sum(n for _, n in held["pages_by_mapping"]) * 4096 == held["pages_bytes"] > 0
        assert any(label.endswith("echo-server") for label, _ in held["pages_by_mapping"]), held["pages_by_mapping"]
        assert " pages [stack]" in ins.stdout or " pages [anon" in ins.stdout, ins.stdout
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
                                env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])))
        shutil.rmtree(public)
        assert nobody.returncode == 1 and "root only" in nobody.stderr and "Traceback" not in nobody.stderr
        assert stop(proc) == 0
    gone = subprocess.run([*ACTIVATOR, "status", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
    assert gone.returncode == 1 and "no activator is running" in gone.stderr



def test_a_stopped_daemon_is_named_within_seconds_not_waited_for(tmp_path: Path) -> None:
    """Issue 16 item 4: status and reload against a SIGSTOPped daemon answer in one line, exit 1."""
    import signal
    import time

    from activator.daemon import control

    cfg = write_config(tmp_path, {"echo": ECHO})
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], tmp_path / "activator.log") as proc:
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            for verb in ("status", "reload"):
                started = time.monotonic()
                out = subprocess.run([*ACTIVATOR, verb, "-c", str(cfg)], capture_output=True, text=True, timeout=60)
                took = time.monotonic() - started
                assert out.returncode == 1, (verb, out.stderr)
                line = out.stderr.strip()
                assert "\n" not in line and f"the daemon at PID {proc.pid} did not answer within" in line, line
                assert took < control.ANSWER_TIMEOUT + 25, (verb, took)  # not the reload timeout (120 s)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        # Positive control: the same commands answer once it runs again.
        out = subprocess.run([*ACTIVATOR, "status", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        stop(proc)


def test_status_and_reload_still_reach_the_daemon_when_the_file_breaks(tmp_path: Path) -> None:
    """Issue 17 item 4: the file is only needed to find the daemon; a reload of a broken file is refused by the
    daemon itself, so its log (and activator_reloads_total{result="refused"}) says so."""
    cfg = write_config(tmp_path, {"echo": ECHO})
    log = tmp_path / "activator.log"
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        good = cfg.read_text()
        cfg.write_text(good + "\n  oops: [unclosed\n")
        st = subprocess.run([*ACTIVATOR, "status", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
        assert st.returncode == 0 and f"activator pid {proc.pid}" in st.stdout, st.stderr
        assert "warning" in st.stderr and "malformed YAML" in st.stderr
        rl = subprocess.run([*ACTIVATOR, "reload", "-c", str(cfg)], capture_output=True, text=True, timeout=60)
        assert rl.returncode == 2 and "reload refused, the running configuration stays" in rl.stderr, rl.stderr
        assert "reload refused" in log.read_text()  # the daemon heard of it
        cfg.write_text(good)
        stop(proc)


def test_an_apps_output_outlives_its_instance(tmp_path: Path) -> None:
    """Issue 17 item 3: what the app wrote is kept when its instance is reaped, and `activator logs` shows it."""
    port = free_port()
    web = HTTPD | {"command": ["sh", "-c", "echo the template says hello; exec httpd -f -v -p 8080 -h /www"],
                   "listen": f"127.0.0.1:{port}", "idle_timeout": "300ms"}
    dies = ECHO | {"command": ["sh", "-c", "echo 'fatal: no config file' >&2; exit 3"], "listen": free_port()}
    cfg = write_config(tmp_path, {"web": web, "dies": dies})
    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], tmp_path / "activator.log") as proc:
        assert b"404 Not Found" in asyncio.run(http_get(port, "/kept-in-the-log"))  # served; and logged by -v
        state = tmp_path / "state"
        deadline = time.monotonic() + 30
        while not (state / "logs" / "web.output").exists():  # reaped, its output kept
            assert time.monotonic() < deadline, "the output was not kept at reap"
            time.sleep(0.1)
        out = subprocess.run([*ACTIVATOR, "logs", "web", "-c", str(cfg)], capture_output=True, text=True, timeout=30)
        assert out.returncode == 0, out.stderr
        assert "--- web-" in out.stdout and "its output until" in out.stdout and "response:404" in out.stdout
        # the template's output during the build is kept the same way
        assert "--- web-tpl-" in out.stdout and "the template says hello" in out.stdout
        # and an app that dies before it listens: what it said is where the error points, and in `activator logs`
        assert "fatal: no config file" in (state / "logs" / "dies-template.log").read_text()
        died = subprocess.run([*ACTIVATOR, "logs", "dies", "-c", str(cfg)], capture_output=True, text=True,
                              timeout=30)
        assert "fatal: no config file" in died.stdout, died.stderr
        assert (state / "logs" / "web.output").stat().st_mode & 0o077 == 0  # root only
        none = subprocess.run([*ACTIVATOR, "logs", "nosuch", "-c", str(cfg)], capture_output=True, text=True,
                              timeout=30)
        assert none.returncode == 2 and "no service named 'nosuch'" in none.stderr
        stop(proc)


def test_runtime_control_wake_scale_stop_start(tmp_path: Path) -> None:
    """Issue 17 item 9: through the control socket, without editing the file; each logged and counted."""
    port = free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}", "max_instances": 3,
                                                  "idle_timeout": "1h"}})
    log = tmp_path / "activator.log"

    def cli(*words: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*ACTIVATOR, *words, "-c", str(cfg)], capture_output=True, text=True, timeout=300)

    def instances() -> int:
        st = json.loads(cli("status", "--json").stdout)
        return len(st["services"][0]["instances"])

    with daemon([*ACTIVATOR, "run", "-c", str(cfg)], log) as proc:
        assert instances() == 0
        woke = cli("wake", "echo")
        assert woke.returncode == 0 and woke.stdout.strip() == "echo: 1 instance(s) up", woke.stderr
        assert instances() == 1  # restored without a client
        scaled = cli("scale", "echo", "5")
        assert scaled.returncode == 0 and "3 instance(s) up (max_instances 3)" in scaled.stdout, scaled.stderr
        assert instances() == 3
        stopped = cli("stop", "echo")
        assert stopped.returncode == 0 and "stopped" in stopped.stdout, stopped.stderr
        assert instances() == 0 and "STOPPED" in cli("status").stdout
        with socket.create_connection(("127.0.0.1", port), timeout=10) as c:  # refused at once, not held
            c.sendall(b"x")
            c.settimeout(10)
            with contextlib.suppress(ConnectionResetError):  # a reset is refused all the same
                assert c.recv(1) == b""
        assert cli("wake", "echo").returncode == 1  # a stopped service is not woken behind the operator's back
        started = cli("start", "echo")
        assert started.returncode == 0 and "serving again" in started.stdout
        assert echo_once(port, b"back") == b"back"
        unknown = cli("wake", "nosuch")
        assert unknown.returncode == 2 and "no service named 'nosuch'" in unknown.stderr
        text = log.read_text()
        assert "service=echo woken (activator wake)" in text and "(activator stop)" in text
        stop(proc)
