"""The command line as a user meets it: one-line errors, exit codes, nothing left behind, graceful SIGTERM."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from tests.conftest import ECHO, HTTPD, host_resources, write_config

ACTIVATOR = [sys.executable, "-m", "activator"]


def run_cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ACTIVATOR, *args], capture_output=True, text=True, timeout=timeout,
                          env=env or dict(os.environ))


def assert_one_line_error(proc: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("activator: error:")]
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    for f in fragments:
        assert f in lines[0], lines[0]


def test_validate_ok_and_malformed(tmp_path: Path) -> None:
    good = write_config(tmp_path, {"web": HTTPD})
    proc = run_cli("validate", str(good))
    assert proc.returncode == 0 and "ok (1 service(s): web)" in proc.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text("services:\n  web: {image: [x\n")
    proc = run_cli("validate", str(bad))
    assert proc.returncode == 2
    assert_one_line_error(proc, str(bad), "malformed YAML", "at line")


def test_unknown_key_names_file_service_and_key(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"web": HTTPD | {"restart": "always"}})
    proc = run_cli("run", "-c", str(cfg))
    assert proc.returncode == 2
    assert_one_line_error(proc, str(cfg), "services.web.restart: unknown key", "valid keys are")


def test_missing_config_file(tmp_path: Path) -> None:
    assert_one_line_error(run_cli("run", "-c", str(tmp_path / "nope.yaml")), "no such file")




@pytest.mark.engine
def test_missing_image_fails_cleanly(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"ghost": HTTPD | {"image": "activator-test/does-not-exist:1"}})
    proc = run_cli("checkpoint", "ghost", "-c", str(cfg))
    assert_one_line_error(proc, "service 'ghost'", "activator-test/does-not-exist:1", "docker pull")
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []


@pytest.mark.engine
def test_port_in_use(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        cfg = write_config(tmp_path, {"web": HTTPD | {"listen": f"127.0.0.1:{port}"}})
        proc = run_cli("run", "-c", str(cfg))
    assert_one_line_error(proc, str(cfg), "services.web.listen", f"127.0.0.1:{port}", "already in use")


@pytest.mark.engine
def test_app_that_never_listens(tmp_path: Path) -> None:
    svc = HTTPD | {"command": ["sleep", "600"], "readiness": {"timeout": "1s"}}
    cfg = write_config(tmp_path, {"mute": svc})
    proc = run_cli("checkpoint", "mute", "-c", str(cfg))
    assert_one_line_error(proc, "service 'mute'", "did not listen on port 8080 within 1s", "readiness.timeout")
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []
    assert not [n for n in res["netns"] if n.startswith("activator-mute-")]
    assert not list((tmp_path / "state" / "checkpoints").glob(".build-*"))


@pytest.mark.engine
def test_a_readiness_command_that_leaves_a_process_behind_is_named(tmp_path: Path) -> None:
    """What a readiness command starts and leaves running would be dumped with the app: refused, in one line.
    The app's own processes (PostgreSQL forks a backend for pg_isready's connection: test_postgres.py) are not
    the command's: only processes of another session than the app's count."""
    cfg = write_config(tmp_path, {"lax": HTTPD | {"readiness": {"command": ["sleep 300 & true"]}}})
    proc = run_cli("checkpoint", "lax", "-c", str(cfg))
    assert_one_line_error(proc, "service 'lax'", "readiness.command left processes running in the template",
                          "make it wait for what it starts")
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == [] and res["procs"] == []


@pytest.mark.engine
def test_an_app_on_another_port_is_named_at_once(tmp_path: Path) -> None:
    """Issue 17 item 6: `port: 9999` for an app on 8080 says where it listens, seconds after it does, not at
    the end of a 60 s readiness timeout."""
    import time

    cfg = write_config(tmp_path, {"site": HTTPD | {"port": 9999, "readiness": {"timeout": "60s"}}})
    started = time.monotonic()
    proc = run_cli("checkpoint", "site", "-c", str(cfg))
    assert_one_line_error(proc, "service 'site'", "the app listens on port 8080, not on port 9999",
                          "set 'port: 8080'")
    assert time.monotonic() - started < 40  # not the readiness timeout
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []


@pytest.mark.engine
def test_old_or_missing_criu_is_refused(tmp_path: Path) -> None:
    bindir = tmp_path / "bin"
    bindir.mkdir()
    for tool in ("runc", "docker"):
        os.symlink(shutil.which(tool) or tool, bindir / tool)
    cfg = write_config(tmp_path, {"web": HTTPD})
    env = dict(os.environ, PATH=str(bindir))
    assert_one_line_error(run_cli("run", "-c", str(cfg), env=env), "CRIU not found", "make setup")
    fake = bindir / "criu"
    fake.write_text("#!/bin/sh\necho 'Version: 3.17.1'\n")
    fake.chmod(0o755)
    assert_one_line_error(run_cli("run", "-c", str(cfg), env=env), "CRIU 3.17.1 is too old", "make setup")


@pytest.mark.engine
def test_not_root_is_refused(tmp_path: Path) -> None:
    cfg = Path(tempfile.mkdtemp(prefix="activator-nonroot-")) / "services.yaml"
    shutil.copyfile(write_config(tmp_path, {"web": HTTPD}), cfg)
    cfg.parent.chmod(0o755)
    cfg.chmod(0o644)
    proc = subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *ACTIVATOR, "run", "-c", str(cfg)],
        capture_output=True, text=True, timeout=60, cwd="/",
        env=dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2])),
    )
    shutil.rmtree(cfg.parent)
    assert_one_line_error(proc, "must run as root")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.engine
def test_sigterm_drains_open_transfers_then_exits_0(tmp_path: Path) -> None:
    port, metrics_port = _free_port(), _free_port()
    cfg = write_config(tmp_path, {"echo": ECHO | {"listen": f"127.0.0.1:{port}"}},
                       metrics=f"127.0.0.1:{metrics_port}", drain_timeout="10s")
    log = tmp_path / "activator.log"
    with open(log, "w") as err, subprocess.Popen([*ACTIVATOR, "run", "-c", str(cfg)], stdout=subprocess.PIPE,
                                                stderr=err, text=True) as proc:
        _drain_while_running(proc, port, metrics_port, log)
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []


def _drain_while_running(proc: subprocess.Popen[str], port: int, metrics_port: int, log: Path) -> None:
    try:
        assert proc.stdout is not None
        deadline = time.monotonic() + 60
        while "metrics on" not in (line := proc.stdout.readline()):
            assert line and time.monotonic() < deadline, "activator did not become ready"
        client = socket.create_connection(("127.0.0.1", port), timeout=10)
        client.sendall(b"before")
        assert client.recv(6) == b"before"
        scrape = subprocess.run(["python3", "-c", f"import urllib.request as u; print(u.urlopen("
                                 f"'http://127.0.0.1:{metrics_port}/metrics').read().decode())"],
                                capture_output=True, text=True, timeout=10).stdout
        assert 'activator_restores_total{service="echo"} 1.0' in scrape
        proc.send_signal(signal.SIGTERM)
        while "draining 1 connection(s)" not in log.read_text():  # the drain is under way...
            assert time.monotonic() < deadline and proc.poll() is None, log.read_text()
            time.sleep(0.01)
        client.sendall(b"during-drain")  # ... and the open transfer still works
        client.shutdown(socket.SHUT_WR)
        got = b""
        while chunk := client.recv(65536):
            got += chunk
        assert got == b"during-drain"
        client.close()
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.engine
def test_runc_failure_while_building_names_the_service(tmp_path: Path) -> None:
    broken = tmp_path / "runc-broken"
    # Like runc, it reports to its --log file, where its own message already starts with "runc run failed".
    broken.write_text(f"""#!/bin/sh
log=; prev=
for a in "$@"; do
    [ "$prev" = --log ] && log=$a
    [ "$a" = run ] && {{ echo 'level=error msg="runc run failed: no luck"' >> "$log"; exit 1; }}
    prev=$a
done
exec {shutil.which("runc")} "$@"
""")
    broken.chmod(0o755)
    cfg = write_config(tmp_path, {"web": HTTPD}, runc=str(broken))
    proc = run_cli("checkpoint", "web", "-c", str(cfg))
    assert_one_line_error(proc, "service 'web'", "building its checkpoint failed", "runc run failed: no luck")
    assert "runc run failed: runc run failed" not in proc.stderr  # runc's own prefix is not repeated
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []


@pytest.mark.engine
def test_checkpoint_of_a_current_checkpoint_touches_nothing(tmp_path: Path) -> None:
    """Issue 17 item 7: an offline `activator checkpoint` that finds its checkpoint current does not open the
    instance network (before: iptables rules added and logged, then removed)."""
    cfg = write_config(tmp_path, {"web": HTTPD})
    first = run_cli("checkpoint", "web", "-c", str(cfg))
    assert first.returncode == 0 and "checkpoint built" in first.stdout, first.stderr
    again = run_cli("checkpoint", "web", "-c", str(cfg))
    assert again.returncode == 0 and "checkpoint is current" in again.stdout, again.stderr
    assert "iptables" not in again.stderr and "bridge" not in again.stderr, again.stderr


def test_inspect_without_a_checkpoint_says_how_to_make_one(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"web": HTTPD})
    proc = run_cli("inspect", "web", "-c", str(cfg))
    assert_one_line_error(proc, "service 'web' has no checkpoint", "activator checkpoint web")
    assert_one_line_error(run_cli("inspect", "nope", "-c", str(cfg)), "no service named 'nope'", "known: web")


def test_without_pycriu_reading_a_checkpoint_is_a_one_line_error(tmp_path: Path) -> None:
    """pycriu is not on PyPI: a venv made by hand lacks it, and `inspect` must say so, not print a traceback."""
    img = tmp_path / "pstree.img"
    img.write_bytes(b"")
    code = ("import sys; sys.modules['pycriu'] = None\n"
            "from activator.checkpoints.store import _load_img\n"
            "from activator.errors import ActivatorError\n"
            f"try:\n    _load_img(__import__('pathlib').Path({str(img)!r}))\n"
            "except ActivatorError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    assert out.stdout.count("\n") == 1 and "pycriu is not installed" in out.stdout and "make setup" in out.stdout


def test_json_logs_for_log_shippers(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"echo": ECHO})
    out = subprocess.run([*ACTIVATOR, "--log-format", "json", "checkpoint", "echo", "-c", str(cfg)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    records = [json.loads(line) for line in out.stderr.splitlines()]  # every line is one JSON object
    assert {"time", "level", "logger", "message"} <= set(records[0])
    building = [r for r in records if "building a checkpoint" in r["message"]]
    assert building and building[0]["service"] == "echo" and building[0]["level"] == "info"
    assert out.stdout.startswith("echo: checkpoint built in")


@pytest.mark.engine
def test_validate_checks_what_can_be_checked_without_starting_anything(tmp_path: Path) -> None:
    """Issue 17 item 5: a missing image and a port in use said by validate, not by the run; --file-only (the
    unit's ExecStartPre) checks the file alone."""
    missing = write_config(tmp_path, {"web": HTTPD | {"image": "activator-test/not-there:1"}})
    proc = run_cli("validate", str(missing))
    assert proc.returncode == 1
    assert_one_line_error(proc, "services.web.image", "activator-test/not-there:1", "docker pull")
    assert run_cli("validate", "--file-only", str(missing)).returncode == 0
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        port = blocker.getsockname()[1]
        taken = write_config(tmp_path, {"web": HTTPD | {"listen": f"127.0.0.1:{port}"}})
        proc = run_cli("validate", str(taken))
        assert_one_line_error(proc, "services.web.listen", f"127.0.0.1:{port}", "already in use")
    profile = write_config(tmp_path, {"web": HTTPD | {"seccomp": "/nonexistent/profile.json"}})
    assert_one_line_error(run_cli("validate", str(profile)), "services.web.seccomp", "does not exist")
    assert run_cli("validate", str(write_config(tmp_path, {"web": HTTPD}))).returncode == 0  # control


@pytest.mark.engine
def test_validate_names_what_a_compose_file_says_that_activator_ignores(tmp_path: Path) -> None:
    """Issue 17 item 2: ignored Compose keys are listed with why; an external volume that does not exist is an
    error before the run."""
    import yaml

    from tests.conftest import BUSYBOX, free_port

    doc = {"x-activator": {"settings": {"state_dir": str(tmp_path / "state"), "metrics": None}},
           "services": {"web": {"image": BUSYBOX, "command": "httpd -f -p 8080 -h /www",
                                "ports": [f"127.0.0.1:{free_port()}:8080"], "restart": "always",
                                "labels": {"a": "b"}, "x-activator": {}}}}
    path = tmp_path / "compose.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = run_cli("validate", str(path))
    assert proc.returncode == 0, proc.stderr
    assert f"{path}: services.web.restart: ignored: activator starts instances on demand" in proc.stdout
    assert f"{path}: services.web.labels: ignored: container metadata for Docker" in proc.stdout
    doc["services"]["web"]["volumes"] = ["ext:/data"]  # type: ignore[index]
    doc["volumes"] = {"ext": {"external": True, "name": "activator-test-never-created"}}
    path.write_text(yaml.safe_dump(doc))
    assert_one_line_error(run_cli("validate", str(path)), "services.web.volumes[0]",
                          "Docker volume 'activator-test-never-created' does not exist", "docker volume create")


def _validate_lines(path: Path) -> tuple[int, list[str]]:
    proc = run_cli("validate", "-c", str(path))
    assert "Traceback" not in proc.stderr
    return proc.returncode, [ln.removeprefix("activator: error: ") for ln in proc.stderr.splitlines()]


@pytest.mark.engine
def test_validate_refuses_what_run_refuses_each_problem_on_its_line(tmp_path: Path) -> None:
    """Issue 31 item 5: the host's side of a file (binaries, state_dir, the image's users, addresses in use), each
    problem one exact line, all of them in one run; `run` refuses the same files."""
    from tests.conftest import free_port

    a_file = tmp_path / "not-a-dir"
    a_file.write_text("")
    with socket.socket() as blocker, socket.socket() as blocker2:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        blocker2.bind(("127.0.0.1", 0))
        blocker2.listen()
        taken2 = blocker2.getsockname()[1]
        web = HTTPD | {"listen": f"127.0.0.1:{free_port()}"}
        cases: list[tuple[str, dict[str, object], dict[str, object], list[str]]] = [
            ("state_dir a file", {"state_dir": str(a_file)}, {},
             [f"settings.state_dir: {a_file} is not a directory; remove what is in the way or pick another path"]),
            ("state_dir under a file", {"state_dir": str(a_file / "state")}, {},
             [f"settings.state_dir: {a_file} is not a directory; remove what is in the way or pick another path"]),
            ("runc missing", {"runc": "/nonexistent/runc"}, {},
             ["settings.runc: runc not found at '/nonexistent/runc' (settings.runc); run 'make setup' (as root) to "
              "install it"]),
            ("criu missing", {"criu": "/nonexistent/criu"}, {},
             ["settings.criu: CRIU not found at '/nonexistent/criu' (settings.criu); run 'make setup' (as root) to "
              "install it"]),
            ("a user the image lacks", {}, {"user": "nosuchuser"},
             ["services.web.user: user 'nosuchuser' is not in the image's /etc/passwd; name a user the image has, "
              "or a number"]),
            ("a group the image lacks", {}, {"user": "nobody:nosuchgroup"},
             ["services.web.user: group 'nosuchgroup' is not in the image's /etc/group; name a user the image has, "
              "or a number"]),
            ("an image the engine lacks", {}, {"image": "activator-test/not-there:1"},
             ["services.web.image: image 'activator-test/not-there:1' is not in the local Docker engine; build or "
              "pull it (docker pull activator-test/not-there:1, or make images for the demo images)"]),
            ("a listen address in use", {}, {"listen": f"127.0.0.1:{taken}"},
             [f"services.web.listen: 127.0.0.1:{taken} is already in use by another process; stop it or pick "
              "another port"]),
            ("the metrics address in use", {"metrics": f"127.0.0.1:{taken}"}, {},
             [f"settings.metrics: cannot listen on 127.0.0.1:{taken}: Address already in use; pick another address "
              "or set it to null"]),
            ("the agent address in use", {"agent": {"listen": f"127.0.0.1:{taken}"}}, {},
             [f"settings.agent.listen: cannot listen on 127.0.0.1:{taken}: Address already in use; pick another "
              "address or remove settings.agent"]),
            ("a seccomp profile missing", {}, {"seccomp": "/nonexistent/profile.json"},
             ["services.web.seccomp: /nonexistent/profile.json does not exist"]),
            ("all of them at once", {"runc": "/nonexistent/runc", "metrics": f"127.0.0.1:{taken2}"},
             {"user": "nosuchuser", "listen": f"127.0.0.1:{taken}"},
             ["settings.runc: runc not found at '/nonexistent/runc' (settings.runc); run 'make setup' (as root) to "
              "install it",
              f"settings.metrics: cannot listen on 127.0.0.1:{taken2}: Address already in use; pick another address "
              "or set it to null",
              "services.web.user: user 'nosuchuser' is not in the image's /etc/passwd; name a user the image has, "
              "or a number",
              f"services.web.listen: 127.0.0.1:{taken} is already in use by another process; stop it or pick "
              "another port"]),
        ]
        for name, settings, service, lines in cases:
            path = write_config(tmp_path, {"web": web | service}, **settings)
            rc, said = _validate_lines(path)
            assert said == [f"{path}: {line}" for line in lines], (name, said)
            assert rc == (2 if name == "a seccomp profile missing" else 1), name  # 2: the file's own problem
        # run's verdict on the same files: refused, naming the same key
        same: list[tuple[dict[str, object], dict[str, object], str]] = [
            ({"state_dir": str(a_file)}, {}, "settings.state_dir"),
            ({"runc": "/nonexistent/runc"}, {}, "runc not found at '/nonexistent/runc'"),
            ({}, {"listen": f"127.0.0.1:{taken}"}, "services.web.listen")]
        for settings, service, key in same:
            path = write_config(tmp_path, {"web": web | service}, **settings)
            assert_one_line_error(run_cli("run", "-c", str(path)), key)
    # controls: users the image has, by name and number, and the addresses said
    for user in ("nobody", "nobody:nogroup", "1000", "1000:1000"):
        path = write_config(tmp_path, {"web": web | {"user": user}})
        proc = run_cli("validate", "-c", str(path))
        assert proc.returncode == 0 and proc.stderr == "", (user, proc.stderr)
        assert f"  web listens on {web['listen']} (tcp)\n" in proc.stdout
    bare = tmp_path / "bare.yaml"
    port = str(web["listen"]).rsplit(":", 1)[1]
    bare.write_text(write_config(tmp_path, {"web": web}).read_text().replace(f"listen: {web['listen']}",
                                                                            f"listen: ':{port}'"))
    proc = run_cli("validate", str(bare))
    assert proc.returncode == 0, proc.stderr
    assert f"  web listens on 0.0.0.0:{port} (tcp; every interface of this host)\n" in proc.stdout
    assert f"{bare}: services.web.listen: warning: ':{port}' names no host, so it listens on every interface" \
        in proc.stdout
