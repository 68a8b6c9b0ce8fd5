"""The container sandbox: at least as tight as `docker run`'s, and kept across checkpoint and restore.

The busybox image has a CGI (scripts/images/sandbox-probe.sh) that reports what a child of the app sees:
seccomp mode, no_new_privs, capability sets, and whether it may create a user or mount namespace. Served by a
*restored* httpd, its answer is the restored process tree's sandbox (seccomp filters are inherited by children
and CRIU restores the app's filter from the dump).
"""

from __future__ import annotations

import asyncio
import json
import os
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


async def test_root_in_an_instance_is_an_unprivileged_uid_on_the_host(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The app runs as root in its instance (uid 0 there) and is the service's range on the host: a host file
    only host root may read stays closed to it even where a bind volume exposes it, while its own files and
    world-readable ones open (positive controls). `docker run` of the same image as root reads the host file."""
    exposed = tmp_path / "exposed"
    exposed.mkdir(mode=0o755)
    (exposed / "host-only").write_text("host root only\n")
    (exposed / "host-only").chmod(0o600)
    (exposed / "public").write_text("anyone\n")
    (exposed / "public").chmod(0o644)
    run = await start({"web": HTTPD | {"volumes": [f"{exposed}:/exposed"]}})
    checkpoint = run.act.services["web"].checkpoint
    assert checkpoint is not None and checkpoint.idmap is not None  # on by default
    idmap = checkpoint.idmap
    (exposed / "mine").write_text("the range's own\n")
    os.chown(exposed / "mine", idmap.host, idmap.host)
    (exposed / "mine").chmod(0o600)

    async def probe(path: str) -> dict[str, str]:
        return _cgi_body(await http_get(run.port("web"), f"/cgi-bin/sandbox?{path}"))

    seen = await probe("/exposed/host-only")
    assert run.metric("activator_restores_total", "web") == 1  # a restored instance answered
    assert seen["uid"] == "0" and seen["read"] == "denied"
    assert (await probe("/exposed/mine"))["read"] == "the range's own"
    assert (await probe("/exposed/public"))["read"] == "anyone"
    # The host sees the range: the app's uid, and the map the kernel keeps for its namespace.
    (inst,) = run.act.services["web"].instances
    pid = await inst.sandbox.pid()
    uids = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:"))
    assert uids.split()[1:] == [str(idmap.host)] * 4
    assert Path(f"/proc/{pid}/uid_map").read_text().split() == ["0", str(idmap.host), str(idmap.size)]
    # Another service has another range: one tenant's root is not another's.
    host = run.act.fleet.host
    assert host is not None
    other = host.builder.ranges.for_service("another")
    assert abs(other.host - idmap.host) >= idmap.size
    # docker run's root is the host's root (no userns-remap on this engine): it reads the file.
    out = await asyncio.to_thread(
        subprocess.run, ["docker", "run", "--rm", "-v", f"{exposed}:/exposed", "--entrypoint", "cat", BUSYBOX,
                         "/exposed/host-only"], capture_output=True, text=True, timeout=120)
    assert out.stdout == "host root only\n", out.stderr


@pytest.mark.parametrize("path", ["criu-rpc", "runc"])
async def test_both_restore_paths_restore_into_the_user_namespace(start, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                                                  path: str) -> None:
    """Instances are restored through CRIU's RPC where device rules are cgroup v1 files (this host), through
    `runc restore` elsewhere (cgroup v2 only): both land in the service's user namespace and its network
    namespace made outside it (the CRIU patch), with a volume and the bound sysfs."""
    from activator.runtime import cgroups

    if path == "runc":
        monkeypatch.setattr(cgroups, "direct", lambda: False)  # what a host that cannot make the cgroups says
    elif not cgroups.direct():
        pytest.fail("the direct CRIU path works on cgroup v1 and v2 hosts: this one says it cannot")
    run = await start({"web": HTTPD | {"volumes": ["webdata:/data"]}})
    assert b"hello from a restored busybox httpd" in await http_get(run.port("web"))
    (inst,) = run.act.services["web"].instances
    assert inst.how == "restore" and run.metric("activator_restores_total", "web") == 1
    checkpoint = run.act.services["web"].checkpoint
    assert checkpoint is not None and checkpoint.idmap is not None
    pid = await inst.sandbox.pid()
    assert pid is not None
    uids = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:"))
    assert uids.split()[1] == str(checkpoint.idmap.host)
    # In the instance's own cgroups (where its limits are), in every hierarchy, not the ones its template was
    # dumped in: through runc on a pure v2 host CRIU was told no cgroup root and made the template's anew
    cgroup = Path(f"/proc/{pid}/cgroup").read_text()
    ours = [ln for ln in cgroup.splitlines() if "/activator/" in ln or "/instances/" in ln]
    assert ours and all(ln.endswith(f"/{inst.sandbox.name}") for ln in ours), cgroup
    assert "-tpl-" not in cgroup, cgroup
    assert os.readlink(f"/proc/{pid}/ns/net") == f"net:[{os.stat(inst.sandbox.netns.path).st_ino}]"
    assert sorted(os.listdir(f"/proc/{pid}/root/sys/class/net")) == ["eth0", "lo"]  # its own namespace's sysfs
