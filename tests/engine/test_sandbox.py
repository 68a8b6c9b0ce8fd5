"""The container sandbox: at least as tight as `docker run`'s, and kept across checkpoint and restore.

The busybox image has a CGI (scripts/images/sandbox-probe.sh) that reports what a child of the app sees:
seccomp mode, no_new_privs, capability sets, and whether it may create a user or mount namespace. Served by a
*restored* httpd, its answer is the restored process tree's sandbox (seccomp filters are inherited by children
and CRIU restores the app's filter from the dump).
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from activator.runtime import seccomp
from tests.conftest import BUSYBOX, HTTPD, http_get

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]


def _probe(text: str) -> dict[str, str]:
    return {k.strip(): v.strip() for k, _, v in (ln.partition(":") for ln in text.splitlines()) if v}


def _cgi_body(reply: bytes) -> dict[str, str]:
    assert b"200 OK" in reply, reply
    # busybox httpd passes the CGI's own header lines (LF-terminated) through after its status line
    body = reply.replace(b"\r\n", b"\n").split(b"\n\n", 1)[1]
    return _probe(body.decode())


def _docker_run_probe() -> dict[str, str]:
    out = subprocess.run(["docker", "run", "--rm", "--entrypoint", "/www/cgi-bin/sandbox", BUSYBOX],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return _probe(out.stdout)


async def test_restored_instance_is_sandboxed_at_least_like_docker_run(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"web": HTTPD})
    ours = _cgi_body(await http_get(run.port("web"), "/cgi-bin/sandbox"))
    assert run.metric("activator_restores_total", "web") == 1  # it was a restored instance that answered
    docker = _docker_run_probe()
    assert ours["Seccomp"] == "2" == docker["Seccomp"]  # a filter is installed
    assert ours["unshare-user"] == "denied" == docker["unshare-user"]
    assert ours["unshare-mount"] == "denied" == docker["unshare-mount"]
    assert ours["NoNewPrivs"] == "1"  # docker run leaves it off; we set it
    bnd, dbnd = int(ours["CapBnd"], 16), int(docker["CapBnd"], 16)
    assert bnd & ~dbnd == 0 and int(ours["CapEff"], 16) & ~int(docker["CapEff"], 16) == 0
    # The app process itself, restored by CRIU, carries the filter too (not only its children).
    (inst,) = run.act.services["web"].instances
    pid = await inst.sandbox.pid()
    assert "Seccomp:\t2" in Path(f"/proc/{pid}/status").read_text()


async def test_seccomp_unconfined_is_a_choice_and_rebuilds(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"web": HTTPD | {"seccomp": "unconfined"}})
    ours = _cgi_body(await http_get(run.port("web"), "/cgi-bin/sandbox"))
    assert ours["Seccomp"] == "0" and ours["unshare-user"] == "allowed"
    ck = run.act.services["web"].checkpoint
    assert ck is not None and ck.origin.seccomp == "unconfined" and ck.seccomp is None


async def test_a_custom_profile_is_applied(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # Docker's profile, minus `mkdir` and `mkdirat` (now EPERM by the default action): busybox mkdir fails.
    profile = json.loads(seccomp.DEFAULT_PROFILE.read_text())
    for rule in profile["syscalls"]:
        rule["names"] = [n for n in rule.get("names", []) if n not in ("mkdir", "mkdirat")]
    path = tmp_path / "no-mkdir.json"
    path.write_text(json.dumps(profile))
    run = await start({"echo": HTTPD | {"seccomp": str(path),
                                        "command": ["sh", "-c", "mkdir /tmp/x || httpd -f -p 8080 -h /www"]}})
    assert b"200 OK" in await http_get(run.port("echo"))  # mkdir failed, so httpd ran
    ck = run.act.services["echo"].checkpoint
    assert ck is not None and not (ck.diff / "tmp" / "x").exists()
