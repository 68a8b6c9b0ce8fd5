"""Names that came from outside, played against the real daemon (issue 30 item 4): a checkpoint record (as if
imported: written into meta.json under state_dir) whose /dev entry names a device node outside the slot, or whose
external mount key carries a CRIU option, is refused when a slot is prepared and leaves nothing on the host; the
untouched checkpoint restores and serves. An image whose /etc is a symlink to a host directory gets its own
/etc/hosts, and the host's directory is not written (from Docker and from Podman)."""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import shutil
import subprocess
import tarfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from activator.config.model import load_config
from activator.daemon.server import Activator
from tests.conftest import BUSYBOX, HTTPD, host_resources, http_get, write_config

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

BODY = b"hello from a restored busybox httpd"


async def serve_once(cfg: Path) -> tuple[bytes, str]:
    """A daemon on the config: one request, how its instance was started; then shut down."""
    act = Activator(load_config(cfg))
    try:
        await act.startup()
        port = int(act.listeners["web"][0].getsockname()[1])
        reply = await http_get(port)
        return reply, act.services["web"].instances[0].how
    finally:
        await act.shutdown()


def refusals(caplog: pytest.LogCaptureFixture, fragment: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if fragment in r.getMessage()]


def tamper(meta: Path, **changes: Any) -> None:
    d = json.loads(meta.read_text())
    for k, v in changes.items():
        d[k] = v(d[k])
    meta.write_text(json.dumps(d))


@pytest_asyncio.fixture
async def built(tmp_path: Path) -> AsyncIterator[tuple[Path, Path]]:
    """A config and its service's checkpoint, built and shown to restore and serve (the control)."""
    cfg = write_config(tmp_path, {"web": HTTPD})
    reply, how = await serve_once(cfg)
    assert BODY in reply and how == "restore", (reply, how)
    yield cfg, tmp_path / "state" / "checkpoints" / "web" / "meta.json"


async def test_a_dev_entry_naming_a_path_outside_the_slot_is_refused(built: tuple[Path, Path], tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    cfg, meta = built
    record = json.loads(meta.read_text())
    # What runc made in the template's /dev, recorded as it is (and only that: extmounts.check)
    assert {(e["name"], e["kind"]) for e in record["dev"]} >= {("null", "chr"), ("pts", "dir"), ("fd", "link")}
    planted = tmp_path / "planted"
    hostile = {"name": "../" * 30 + str(planted).lstrip("/"), "kind": "chr", "mode": 0o666,
               "rdev": os.makedev(1, 3), "target": ""}
    tamper(meta, dev=lambda dev: [*dev, hostile])
    caplog.set_level(logging.INFO)
    reply, how = await serve_once(cfg)
    assert BODY in reply and how == "cold-start", (reply, how)  # served all the same, without the checkpoint
    assert not planted.exists() and not os.path.lexists(planted)
    said = refusals(caplog, "checkpoint /dev entry")
    assert said and all("refused: not a plain file name" in r.getMessage() and "\n" not in r.getMessage()
                        and r.exc_info is None for r in said), [r.getMessage() for r in said]
    res = host_resources(tmp_path / "state")
    assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == [], res
    # the control: the same checkpoint without that entry restores again
    tamper(meta, dev=lambda dev: [e for e in dev if e != hostile])
    reply, how = await serve_once(cfg)
    assert BODY in reply and how == "restore", (reply, how)


async def test_an_external_key_carrying_a_criu_option_is_refused(built: tuple[Path, Path], tmp_path: Path,
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    cfg, meta = built
    ran = tmp_path / "action-script-ran"
    script = tmp_path / "evil.sh"
    script.write_text(f"#!/bin/sh\ntouch {ran}\n")
    script.chmod(0o755)
    # a key that, written into the instance's criu.conf unchecked, adds an option of the record's choosing: a
    # script CRIU runs as root on the host
    key = f"mask9]:/x\naction-script {script}\n#"
    tamper(meta, external=lambda ext: ext | {key: "/proc/acpi"})
    caplog.set_level(logging.INFO)
    reply, how = await serve_once(cfg)
    assert BODY in reply and how == "cold-start", (reply, how)
    assert not ran.exists()
    said = refusals(caplog, "checkpoint external mount key")
    assert said and all(r.exc_info is None and "\n" not in r.getMessage() for r in said)
    assert not list((tmp_path / "state" / "instances").glob("*/criu.conf"))
    tamper(meta, external=lambda ext: {k: v for k, v in ext.items() if k != key})
    reply, how = await serve_once(cfg)
    assert BODY in reply and how == "restore", (reply, how)
    assert not ran.exists()


def _dir(name: str) -> tarfile.TarInfo:
    d = tarfile.TarInfo(name)
    d.type, d.mode = tarfile.DIRTYPE, 0o755
    return d


@pytest.fixture(params=["docker", "podman"])
def etc_elsewhere(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[str, Path, dict[str, Any]]]:
    """An image whose /etc is an absolute symlink to a path that, on the host, is a directory of the host's (here a
    stand-in under tmp_path with the host's hosts file in it); in the image that path is the image's own /etc.

    From Docker it is harmless before activator's own defence: `docker create` puts its init layer (a real /etc
    with hosts, hostname, resolv.conf) over the image's symlink, and the unpacked tree is that container's. From
    Podman the symlink reaches the unpacked tree as it is, and only the writer resolving inside the root
    (imagefs.replace_file) keeps the host's directory unwritten."""
    engine = request.param
    if engine == "podman" and shutil.which("podman") is None:
        pytest.skip("needs podman (make setup installs it)")
    victim = tmp_path / "host-etc"
    victim.mkdir()
    (victim / "hosts").write_text("the host's own\n")
    name = f"actest-etc-elsewhere-{secrets.token_hex(3)}:1"
    # Not buildable with a Dockerfile (a RUN has /etc/hosts bind-mounted): the busybox image's tree, rewritten
    # as a tar and imported, with its /etc moved to that path and /etc a symlink to it.
    made = subprocess.run(["docker", "create", BUSYBOX], capture_output=True, text=True, check=True).stdout.strip()
    try:
        exported = subprocess.run(["docker", "export", made], capture_output=True, check=True).stdout
    finally:
        subprocess.run(["docker", "rm", "-f", made], capture_output=True, check=False)
    moved = str(victim).lstrip("/")
    out = io.BytesIO()
    with tarfile.open(fileobj=io.BytesIO(exported)) as src, tarfile.open(fileobj=out, mode="w") as dst:
        members = src.getmembers()
        present = {m.name.removeprefix("./").rstrip("/") for m in members}
        for d in [str(p) for p in Path(moved).parents if str(p) != "."][::-1]:
            if d not in present:  # the directories above it (tmp, ...), as the image's own
                dst.addfile(_dir(d))
        for m in members:
            if m.name in ("etc", "./etc") or m.name.startswith(("etc/", "./etc/")):
                m.name = moved + m.name.removeprefix("./").removeprefix("etc")
            if m.islnk() and m.linkname.removeprefix("./").startswith("etc/"):
                m.linkname = moved + m.linkname.removeprefix("./").removeprefix("etc")
            dst.addfile(m, src.extractfile(m) if m.isfile() else None)
        for link_name, target in (("etc", str(victim)), ("www/hosts", "/etc/hosts")):
            link = tarfile.TarInfo(link_name)
            link.type, link.linkname = tarfile.SYMTYPE, target
            dst.addfile(link)
    image = f"localhost/{name}" if engine == "podman" else f"activator-test/{name}"
    imported = subprocess.run([engine, "import", "--change", "ENV PATH=/bin", "-", image], input=out.getvalue(),
                              capture_output=True, timeout=300)
    assert imported.returncode == 0, imported.stderr
    api = None
    settings: dict[str, Any] = {}
    try:
        if engine == "podman":
            sock = tmp_path / "podman.sock"
            api = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            deadline = time.monotonic() + 30
            while not sock.exists():
                assert api.poll() is None and time.monotonic() < deadline, "podman system service did not start"
                time.sleep(0.1)
            settings = {"images": {"engine": "podman", "socket": str(sock)}}
        yield (name if engine == "podman" else image), victim, settings
    finally:
        if api is not None:
            api.terminate()
            api.wait(30)
        subprocess.run([engine, "rmi", "-f", image], capture_output=True, check=False, timeout=120)


async def test_an_image_whose_etc_points_at_a_host_directory_gets_its_own(start, etc_elsewhere) -> None:  # type: ignore[no-untyped-def]
    image, victim, settings = etc_elsewhere
    before = {p.name: p.read_bytes() for p in victim.iterdir()}
    run = await start({"web": HTTPD | {"image": image}}, **settings)
    reply = await http_get(run.port("web"), "/hosts")
    # the control: the instance reads the /etc/hosts activator wrote, in its own /etc
    assert b"200 OK" in reply and b"127.0.0.1\tlocalhost web\n" in reply, reply
    assert run.act.services["web"].instances[0].how == "restore"
    # the host's directory of that name: not one byte written, nothing added (no hosts, no resolv.conf)
    assert {p.name: p.read_bytes() for p in victim.iterdir()} == before
