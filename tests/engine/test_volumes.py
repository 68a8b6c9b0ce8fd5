"""Volumes: data written through one instance is there for the next one restored from the same checkpoint."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest

from tests.conftest import HTTPD, eventually, host_resources, http_get

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

CGI = {
    "write": 'echo "$QUERY_STRING" >> /data/log && echo written',
    "read": "cat /data/log",
    "tryro": "if echo x > /www/cgi-bin/x 2>/dev/null; then echo wrote; else echo refused; fi",
}


def cgi_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cgi"
    d.mkdir()
    for name, body in CGI.items():
        (d / name).write_text(f"#!/bin/sh\necho 'Content-Type: text/plain'\necho\n{body}\n")
        (d / name).chmod(0o755)
    return d


def body(response: bytes) -> str:
    return response.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1].decode().strip()  # CGI headers end in \n


async def test_data_outlives_the_instance_that_wrote_it(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    web = HTTPD | {"idle_timeout": "300ms", "volumes": ["data:/data", f"{cgi_dir(tmp_path)}:/www/cgi-bin:ro"]}
    run = await start({"web": web})
    state = run.config.settings.state_dir
    port = run.port("web")
    svc = run.act.services["web"]
    assert body(await http_get(port, "/cgi-bin/write?first")) == "written"
    first = svc.instances[0].sandbox.name
    await eventually(lambda: not svc.instances, what="the writer reaped")
    assert body(await http_get(port, "/cgi-bin/write?second")) == "written"
    assert svc.instances[0].sandbox.name != first  # a new instance, restored from the same checkpoint
    assert body(await http_get(port, "/cgi-bin/read")) == "first\nsecond"
    assert body(await http_get(port, "/cgi-bin/tryro")) == "refused"  # :ro is read-only inside
    volume = state / "volumes" / "data"
    assert (volume / "log").read_text() == "first\nsecond\n"
    assert stat.S_IMODE((state / "volumes").stat().st_mode) == 0o700  # app data: root only on the host
    await run.act.shutdown()
    assert (volume / "log").read_text() == "first\nsecond\n"  # kept after everything is gone
    left = host_resources(state)
    assert left["mounts"] == [] and left["dirs"] == []


async def test_a_new_named_volume_starts_with_what_the_image_has_there(start, caplog) -> None:  # type: ignore[no-untyped-def]
    run = await start({"site": HTTPD | {"volumes": ["site:/www"]}})
    filled = run.config.settings.state_dir / "volumes" / "site"
    assert (filled / "cgi-bin" / "sandbox").is_file()  # the image's /www, copied with its modes
    assert b"200 OK" in await http_get(run.port("site"), "/")


async def test_an_image_volume_that_is_not_kept_is_warned_about(start, caplog) -> None:  # type: ignore[no-untyped-def]
    import asyncio
    import subprocess

    from tests.conftest import BUSYBOX

    image = "activator-test/with-volume:latest"
    build = await asyncio.to_thread(subprocess.run, ["docker", "build", "-q", "-t", image, "-"],
                                    input=f"FROM {BUSYBOX}\nVOLUME /var/lib/app\n", capture_output=True, text=True,
                                    timeout=120)
    assert build.returncode == 0, build.stderr
    try:
        await start({"app": HTTPD | {"image": image}, "kept": HTTPD | {"image": image,
                                                                       "volumes": ["appdata:/var/lib/app"]}})
    finally:
        await asyncio.to_thread(subprocess.run, ["docker", "rmi", "-f", image], capture_output=True)
    warnings = [r.getMessage() for r in caplog.records if "declares VOLUME" in r.getMessage()]
    assert len(warnings) == 1 and warnings[0].startswith("service=app ")
    assert "add `volumes: [app-var-lib-app:/var/lib/app]` to keep it" in warnings[0]


async def test_an_external_docker_volume_is_used_as_it_is(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Compose's `external: true`: the operator's existing Docker volume, its data, not a fresh empty one."""
    import asyncio
    import json
    import subprocess
    import uuid

    name = f"activator-test-{uuid.uuid4().hex[:8]}"
    def docker(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["docker", "volume", *args], capture_output=True, text=True, timeout=60)

    made = await asyncio.to_thread(docker, "create", name)
    assert made.returncode == 0, made.stderr
    try:
        where = Path(json.loads((await asyncio.to_thread(docker, "inspect", name)).stdout)[0]["Mountpoint"])
        (where / "log").write_text("the operator's data\n")
        web = HTTPD | {"volumes": [{"source": name, "target": "/data", "external": True},
                                   f"{cgi_dir(tmp_path)}:/www/cgi-bin:ro"]}
        run = await start({"web": web})
        assert body(await http_get(run.port("web"), "/cgi-bin/read")) == "the operator's data"
        assert body(await http_get(run.port("web"), "/cgi-bin/write?more")) == "written"
        assert (where / "log").read_text() == "the operator's data\nmore\n"  # written into Docker's volume
        assert not (run.config.settings.state_dir / "volumes" / name).exists()
        await run.act.shutdown()
    finally:
        await asyncio.to_thread(docker, "rm", "-f", name)
