"""Fixtures for the real-engine tests: an Activator started in-process on uvloop against dockerd, runc and CRIU.

Every test gets its own state_dir (so its own runc root, checkpoints and instances). The fixture binds each
service's listening socket itself on port 0 and hands it to the Activator (as systemd would), so the config
names the real port and no two tests race for one. Waiting is done on conditions with deadlines, never bare
sleeps.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any, NamedTuple

import pytest
import pytest_asyncio
import uvloop
import yaml

from activator.config.model import Config, load_config
from activator.daemon.server import Activator

#: How much slower than this host the machine is: the v2 VM under QEMU's emulation (scripts/vm) sets ~10. Tests whose
#: behaviour depends on a timeout being long enough for the test's own steps (an idle_timeout the test must beat)
#: scale it by this, and so do the deadlines of the waits in the tests that the VM runs (a bound, never a sleep).
SLOW = float(os.environ.get("ACTIVATOR_TEST_SLOW", "1"))
BUSYBOX = "activator-demo/busybox:latest"
ECHO = {"image": BUSYBOX, "command": ["echo-server", "9000"], "port": 9000}
HTTPD = {"image": BUSYBOX, "command": ["httpd", "-f", "-p", "8080", "-h", "/www"], "port": 8080}


def passable(path: Path) -> Path:
    """Let other users pass through (not list) path and its parents, as a state_dir's parents must for instances
    in a user namespace (pytest makes its temporary directories 0700)."""
    for d in [path, *path.parents]:
        mode = d.stat().st_mode
        if not mode & 0o001:
            d.chmod(mode & 0o7777 | 0o001)
    return path


def _engine_missing() -> list[str]:
    missing = []
    if os.geteuid() != 0:
        missing.append("root")
    # runc, CRIU and dockerd for every real test; the daemon tests also use systemd-socket-activate and setpriv.
    for tool in ("runc", "criu", "docker", "systemd-socket-activate", "setpriv"):
        if shutil.which(tool) is None:
            missing.append(tool)
    if shutil.which("docker") and subprocess.run(["docker", "image", "inspect", BUSYBOX],
                                                 capture_output=True).returncode != 0:
        missing.append(f"image {BUSYBOX} (scripts/build-images.sh busybox)")
    return missing


@pytest.fixture(autouse=True)
def _engine_required(request: pytest.FixtureRequest) -> None:
    if "tmp_path" in request.fixturenames:  # tests/engine's files are not all marked: state dirs live there
        passable(request.getfixturevalue("tmp_path"))
    if request.node.get_closest_marker("engine") is None:
        return
    missing = _engine_missing()
    if not missing:
        return
    if os.environ.get("CI"):
        # In CI the engine must be there: a skipped real test would hide a broken setup.
        pytest.fail(f"real-engine test but missing: {', '.join(missing)}")
    pytest.skip(f"needs {', '.join(missing)}; run make setup")


#: what reached the event loop's exception handler during the current test (a callback that raised, a task whose
#: exception nobody retrieved): each fails the test that caused it, instead of being logged and forgotten
_loop_errors: list[dict[str, Any]] = []


def _record(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    _loop_errors.append(context)
    loop.default_exception_handler(context)


def _new_loop() -> asyncio.AbstractEventLoop:
    loop = uvloop.new_event_loop()
    loop.set_exception_handler(_record)
    return loop


def pytest_asyncio_loop_factories(config: pytest.Config, item: pytest.Item) -> dict[str, Any]:
    # The product runs on uvloop; so do its tests.
    return {"uvloop": _new_loop}


@pytest.fixture(autouse=True)
def _no_loop_errors() -> Any:
    """Autouse, so set up before (and torn down after) every other fixture: a shutdown's errors count too."""
    _loop_errors.clear()
    yield
    if _loop_errors:
        said = "; ".join(f"{c.get('message')}: {c.get('exception')!r}" for c in _loop_errors)
        _loop_errors.clear()
        pytest.fail(f"exception in an event-loop callback or task: {said}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(tmp_path: Path, services: dict[str, Any], **settings: Any) -> Path:
    body = {
        "settings": {"state_dir": str(tmp_path / "state"), "metrics": None, "drain_timeout": "2s"} | settings,
        "services": {name: {"listen": f"127.0.0.1:{free_port()}"} | svc for name, svc in services.items()},
    }
    path = tmp_path / "services.yaml"
    path.write_text(yaml.safe_dump(body))
    return path


class Running:
    def __init__(self, act: Activator) -> None:
        self.act = act

    @property
    def config(self) -> Config:
        return self.act.config

    def port(self, service: str) -> int:
        return int(self.act.listeners[service][0].getsockname()[1])

    def metric(self, name: str, service: str, **labels: str) -> float:
        value = self.act.metrics.registry.get_sample_value(name, {"service": service, **labels})
        return value or 0.0


@pytest_asyncio.fixture
async def start(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Running]]]:
    started: list[Activator] = []

    async def _start(services: dict[str, Any], **settings: Any) -> Running:
        socks = []
        with_ports = {}
        for name, svc in services.items():
            if "listen" not in svc:
                sock = socket.socket()
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind(("127.0.0.1", 0))
                sock.listen(1024)
                socks.append(sock)
                svc = {"listen": f"127.0.0.1:{sock.getsockname()[1]}"} | svc
            with_ports[name] = svc
        act = Activator(load_config(write_config(tmp_path, with_ports, **settings)), sockets=socks)
        started.append(act)
        await act.startup()
        return Running(act)

    yield _start
    # A test that failed half-way leaves its long-lived clients open; cut them here, on a loop still running,
    # or the loop's close reports them as unclosed against the next test (seen in the VM).
    while _held_clients:
        _held_clients.pop().transport.abort()
    for act in started:
        await act.shutdown()


async def eventually(check: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


async def echo(port: int, payload: bytes, chunk: int = 65536) -> bytes:
    """Send payload, half-close, read everything back until the server closes."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)

    async def send() -> None:
        for i in range(0, len(payload), chunk):
            writer.write(payload[i:i + chunk])
            await writer.drain()
        writer.write_eof()

    sender = asyncio.ensure_future(send())
    got = await asyncio.wait_for(reader.read(), 30)
    await sender
    writer.close()
    return got


async def http_get(port: int, path: str = "/") -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.0\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    data = await asyncio.wait_for(reader.read(), 30)
    writer.close()
    return data


class HostNames(NamedTuple):
    """activator's names that are global to the host, not to a state dir."""
    netns: frozenset[str]  # activator-NAME under /run/netns
    cgroups: frozenset[Path]  # NAME under an `activator` group of any hierarchy (v1's, v2's unified one)


def host_names() -> HostNames:
    run = Path("/run/netns")
    netns = frozenset(p.name for p in run.glob("activator-*")) if run.is_dir() else frozenset()
    root = Path("/sys/fs/cgroup")
    groups = frozenset(p for p in [*root.glob("*/activator/*"), *root.glob("activator/*")] if p.is_dir())
    return HostNames(netns, groups)


def _procs(groups: Iterable[Path]) -> set[str]:
    procs: set[str] = set()
    for cg in groups:
        with contextlib.suppress(OSError):
            procs.update((cg / "cgroup.procs").read_text().split())
    return procs


#: Host-global names that existed before this session: a killed earlier run's leftovers (/run may live on disk and
#: outlast a reboot) or a daemon running beside the tests. They are not this session's leaks, and counting them
#: would fail every leak check after the first; pytest's header lists them.
PREEXISTING = host_names()

# The daemons these tests run in-process must put their cgroups where host_resources looks: run as a systemd
# service (a CI runner's unit), they would go under that unit (cgroups.use_unit_cgroup) and no cgroup leak could
# be seen. The tests of that mode set INVOCATION_ID themselves, for the daemon they start.
os.environ.pop("INVOCATION_ID", None)


def pytest_report_header(config: pytest.Config) -> str | None:
    old = sorted([*PREEXISTING.netns, *map(str, PREEXISTING.cgroups)])
    if not old:
        return None
    running = len(_procs(PREEXISTING.cgroups))
    return (f"leak checks ignore {len(old)} activator names older than this session ({running} processes in their "
            f"cgroups): {', '.join(old[:6])}")


def host_resources(state_dir: Path) -> dict[str, list[str]]:
    """What activator owns on the host right now, for one state dir: the leak checker. Prepared slots (made
    ahead on purpose, marked with a `slot` file) are listed apart, with their mounts and namespaces; what
    existed before the session (PREEXISTING) is not counted."""
    runc = subprocess.run(["runc", "--root", str(state_dir / "runc"), "list", "-q"],
                          capture_output=True, text=True).stdout.split()
    inst = state_dir / "instances"
    slots = sorted(p.parent.name for p in inst.glob("*/slot")) if inst.is_dir() else []
    prefix = str(state_dir) + "/"
    slot_prefixes = tuple(f"{inst}/{s}/" for s in slots)
    with open("/proc/self/mountinfo") as f:
        mounts = [line.split()[4] for line in f
                  if line.split()[4].startswith(prefix) and not line.split()[4].startswith(slot_prefixes)]
    now = host_names()
    netns = sorted(n for n in now.netns - PREEXISTING.netns if n.removeprefix("activator-") not in slots)
    dirs = sorted(p.name for p in inst.iterdir() if p.name not in slots) if inst.is_dir() else []
    groups = [p for p in now.cgroups - PREEXISTING.cgroups if p.name not in slots]
    cgroups = sorted(str(p) for p in groups)
    procs = _procs(groups)  # what runs in them: the apps (and CRIU while it restores)
    return {"runc": runc, "mounts": mounts, "netns": netns, "dirs": dirs, "cgroups": cgroups, "procs": sorted(procs),
            "slots": slots}


def faulty_restore(tmp_path: Path, *, restore_delay: float = 0, restore_fails: bool = False,
                   only: str = "", phase: str = "pre-restore") -> tuple[dict[str, str], Path]:
    """Settings for a runc and a CRIU that are real but slow or failing to restore: the fault is injected at the
    edge (a CRIU action script run at pre-restore, through a config file both wrappers hand to CRIU), not mocked,
    and whichever way an instance is restored (CRIU directly, or runc on a cgroup v2 host).

    The fault strikes at CRIU's `phase`: pre-restore is before anything is restored, post-restore when the app's
    processes exist but have not been resumed, post-resume once they run (before CRIU answers). Every restore
    attempt (of services whose name starts with `only`, if given) appends a line to the returned file, so tests
    can count attempts.
    """
    attempts = tmp_path / "restore-attempts"
    action = tmp_path / "restore-fault"
    fail = 'echo "injected restore failure" >&2; exit 1' if restore_fails else ":"
    action.write_text(f"""#!/bin/sh
[ "$CRTOOLS_SCRIPT_ACTION" = {phase} ] || exit 0
case "$(readlink "$CRTOOLS_IMAGE_DIR")" in */checkpoints/{only}*) ;; *) exit 0 ;; esac
echo x >> {attempts}
sleep {restore_delay}
{fail}
exit 0
""")
    conf = tmp_path / "criu-fault.conf"
    conf.write_text(f"action-script {action}\n")
    wrappers = {}
    for tool in ("runc", "criu"):
        wrapper = tmp_path / f"{tool}-faulty"
        wrapper.write_text(f"#!/bin/sh\nCRIU_CONFIG_FILE={conf} exec {shutil.which(tool)} \"$@\"\n")
        wrapper.chmod(0o755)
        wrappers[tool] = str(wrapper)
    action.chmod(0o755)
    return wrappers, attempts


async def loadgen(port: int, *args: str) -> dict[str, Any]:
    """tests/loadgen.py in its own process (its own event loop): its JSON summary (`ok` is a count)."""
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "tests.loadgen", str(port), *args,
                                                stdout=subprocess.PIPE, cwd=Path(__file__).resolve().parents[1])
    out, _ = await asyncio.wait_for(proc.communicate(), 240)
    assert proc.returncode == 0
    result: dict[str, Any] = json.loads(out)
    return result


_held_clients: list[asyncio.StreamWriter] = []


async def open_echo(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A long-lived connection, proven to go through to the app with one round trip (`start` cuts it at the
    latest)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    _held_clients.append(writer)
    writer.write(b"hi")
    await writer.drain()
    assert await asyncio.wait_for(reader.readexactly(2), 30) == b"hi"
    return reader, writer


async def closed_without_data(port: int, payload: bytes = b"hello") -> bool:
    """Connect and send; True if the activator closed us (EOF or reset) without a byte of answer."""
    try:
        got = await echo(port, payload)
    except (ConnectionResetError, BrokenPipeError, ConnectionRefusedError):
        return True  # refused: turned away in the kernel (max_connections on the kernel path)
    return got == b""
