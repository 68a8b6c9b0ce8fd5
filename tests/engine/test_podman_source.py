"""Podman as the image source (issue 22 item 4): `settings.images: {engine: podman, socket: ...}` serves a service
from an image that only Podman has, through Podman's Docker-compatible API (Debian 12's podman 4.3 behind
`podman system service`); the same image is a one-line error against Docker (the control), and an API socket
nobody answers is a one-line error naming the fix."""

from __future__ import annotations

import secrets
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import BUSYBOX, HTTPD, http_get, write_config

from .test_cli import assert_one_line_error, run_cli

pytestmark = [pytest.mark.engine,
              pytest.mark.skipif(shutil.which("podman") is None, reason="needs podman (make setup installs it)")]

TEXT = "hello from an image only Podman has"


def podman(*argv: str, timeout: float = 180) -> str:
    p = subprocess.run(["podman", *argv], capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"podman {' '.join(argv)}: {p.stderr[-2000:]}"
    return p.stdout


@pytest.fixture
def podman_image(tmp_path: Path) -> Iterator[str]:
    """localhost/actest-...:1, built by Podman from the busybox test image with a page of its own."""
    name = f"actest-podman-{secrets.token_hex(3)}:1"
    saved = tmp_path / "busybox.tar"
    subprocess.run(["docker", "save", BUSYBOX, "-o", str(saved)], check=True, timeout=120)
    podman("load", "-q", "-i", str(saved))
    ctx = tmp_path / "ctx"
    ctx.mkdir()
    (ctx / "index.html").write_text(TEXT + "\n")
    (ctx / "Containerfile").write_text(f"FROM localhost/{BUSYBOX}\nCOPY index.html /www/index.html\n")
    podman("build", "-q", "-t", f"localhost/{name}", str(ctx))
    try:
        yield name
    finally:
        subprocess.run(["podman", "rmi", "-f", f"localhost/{name}"], capture_output=True, timeout=120)


@pytest.fixture
def podman_api(tmp_path: Path) -> Iterator[Path]:
    """Podman's Docker-compatible API on a socket of the test's own (the product's default is
    /run/podman/podman.sock, which Debian's podman.socket unit serves)."""
    sock = tmp_path / "podman.sock"
    proc = subprocess.Popen(["podman", "system", "service", "--time=0", f"unix://{sock}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while not sock.exists():
            assert proc.poll() is None and time.monotonic() < deadline, "podman system service did not start"
            time.sleep(0.1)
        yield sock
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.asyncio
async def test_a_service_from_a_podman_only_image(start, podman_image: str, podman_api: Path) -> None:  # type: ignore[no-untyped-def]
    run = await start({"web": HTTPD | {"image": podman_image}},
                      images={"engine": "podman", "socket": str(podman_api)})
    assert TEXT.encode() in await http_get(run.port("web"))
    ck = run.act.services["web"].checkpoint
    assert ck is not None and ck.origin.image_id.startswith("sha256:")
    assert run.metric("activator_restores_total", "web") == 1


def test_the_engine_is_the_one_configured(tmp_path: Path, podman_image: str, podman_api: Path) -> None:
    with_podman = write_config(tmp_path, {"web": HTTPD | {"image": podman_image}},
                               images={"engine": "podman", "socket": str(podman_api)})
    ok = run_cli("validate", "-c", str(with_podman))
    assert ok.returncode == 0, ok.stderr
    # The control: Docker does not have it, and says so in one line.
    (tmp_path / "docker").mkdir()
    with_docker = write_config(tmp_path / "docker", {"web": HTTPD | {"image": podman_image}})
    assert_one_line_error(run_cli("validate", "-c", str(with_docker)),
                          f"image '{podman_image}' is not in the local Docker engine", "docker pull")
    # An API socket nobody serves: the engine named, and how to start it.
    (tmp_path / "nobody").mkdir()
    dead = write_config(tmp_path / "nobody", {"web": HTTPD},
                        images={"engine": "podman", "socket": str(tmp_path / "no.sock")})
    assert_one_line_error(run_cli("validate", "-c", str(dead)), "cannot reach the Podman engine at",
                          "podman.socket", "settings.images")
