"""nginx and Caddy in front of an `http: true` service, with the configurations docs/reverse-proxies.md shows
(config/nginx, config/caddy): the waiting page and the app's answers pass through them, 200 concurrent curl
requests through each are all answered, and their upstream keep-alive settings let the instance be reaped."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.conftest import HTTPD, eventually, faulty_restore, free_port

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

ROOT = Path(__file__).resolve().parents[2]
DEMO_UPSTREAM = "127.0.0.1:8080"  # what the shipped configurations point at (the demo Tomcat)


@contextmanager
def nginx(tmp: Path, upstream: str, front: int) -> Iterator[None]:
    site = (ROOT / "config/nginx/activator.conf").read_text()
    assert DEMO_UPSTREAM in site and "listen 80;" in site
    (tmp / "site.conf").write_text(site.replace(DEMO_UPSTREAM, upstream)
                                   .replace("listen 80;", f"listen 127.0.0.1:{front};"))
    (tmp / "nginx.conf").write_text(f"""daemon off; worker_processes 1; pid {tmp}/nginx.pid; error_log {tmp}/error.log;
events {{ worker_connections 1024; }}
http {{ access_log off; include {tmp}/site.conf; }}
""")
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    check = subprocess.run([binary, "-t", "-q", "-c", str(tmp / "nginx.conf")], capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    with _running([binary, "-c", str(tmp / "nginx.conf")], front):
        yield


@contextmanager
def caddy(tmp: Path, upstream: str, front: int) -> Iterator[None]:
    site = (ROOT / "config/caddy/Caddyfile").read_text()
    assert DEMO_UPSTREAM in site and "tomcat.example.org {" in site
    (tmp / "Caddyfile").write_text("{\n\tadmin off\n\tauto_https off\n}\n" + site.replace(DEMO_UPSTREAM, upstream)
                                   .replace("tomcat.example.org {", f"http://127.0.0.1:{front} {{"))
    binary = shutil.which("caddy") or "/usr/bin/caddy"
    with _running([binary, "run", "--adapter", "caddyfile", "--config", str(tmp / "Caddyfile")], front,
                  env={"HOME": str(tmp), "XDG_DATA_HOME": str(tmp), "XDG_CONFIG_HOME": str(tmp), "PATH": "/usr/bin"}):
        yield


@contextmanager
def _running(cmd: list[str], port: int, env: dict[str, str] | None = None) -> Iterator[None]:
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=env)
    try:
        deadline = time.monotonic() + 15
        while subprocess.run(["ss", "-Hltn", f"sport = :{port}"], capture_output=True, text=True).stdout == "":
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            assert time.monotonic() < deadline, f"{cmd[0]} did not listen on {port}"
            time.sleep(0.05)
        yield
    finally:
        proc.terminate()
        proc.wait(10)
        if proc.stderr is not None:
            proc.stderr.close()


async def curl(*args: str) -> bytes:
    proc = await asyncio.create_subprocess_exec("curl", "-s", "--no-progress-meter", *args,
                                                stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return out


@pytest.mark.parametrize("front_proxy", [nginx, caddy], ids=["nginx", "caddy"])
async def test_behind_a_reverse_proxy(start, tmp_path: Path, front_proxy) -> None:  # type: ignore[no-untyped-def]
    tools, _ = faulty_restore(tmp_path, restore_delay=2)
    run = await start({"web": HTTPD | {"http": True, "waiting_page": "300ms", "idle_timeout": "1s"}}, **tools)
    svc = run.act.services["web"]
    front = free_port()
    (tmp_path / "front").mkdir()
    with front_proxy(tmp_path / "front", f"127.0.0.1:{run.port('web')}", front):
        url = f"http://127.0.0.1:{front}/"
        # A browser during the slow restore: the starting page, its status and Retry-After passed through.
        page = await curl("-i", "-H", "Accept: text/html", url)
        assert page.startswith(b"HTTP/1.1 503") and b"web is starting" in page, page
        assert b"retry-after: 1" in page.lower(), page
        # An API client waits through the proxy for the app itself.
        assert b"hello from a restored busybox httpd" in await curl(url)
        # 200 concurrent requests, 50 at a time, all answered by the app.
        codes = await curl("--parallel", "--parallel-max", "50", "-w", "%{http_code}\\n",
                           *["-o", "/dev/null", url] * 200)
        assert codes.split() == [b"200"] * 200, codes
        # The proxy's idle upstream connections go (nginx: none kept; Caddy: keepalive 5s), so the instance does.
        await eventually(lambda: not svc.instances, timeout=20, what="the instance reaped behind the proxy")
