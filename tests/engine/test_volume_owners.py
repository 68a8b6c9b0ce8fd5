"""Bind volumes a non-root app can write (Podman's `:U` and `:idmap`), and what they must never touch.

A busybox httpd runs as 1000:1000 in the service's user namespace; its CGI scripts write into /data, a host
directory. `U` gives the directory to the app's user (host uid RANGE+1000), `idmap` binds it through an idmapped
mount (host uid 1000's files are the app's own, and stay 1000 on the host). Both restore paths are played: the
direct CRIU RPC (this host's cgroup v1 device files) and `runc restore` (a cgroup-v2-only host's).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from activator.runtime import cgroups
from tests.conftest import HTTPD, eventually, host_resources, http_get, write_config

from .test_cli import assert_one_line_error, run_cli
from .test_volumes import body

pytestmark = [pytest.mark.engine]

APP = 1000
CGI = {
    "append": 'if echo "$QUERY_STRING" >> /data/log 2>/dev/null; then echo written; else echo refused; fi',
    "create": 'if echo made > "/data/$QUERY_STRING" 2>/dev/null; then echo written; else echo refused; fi',
    "read": "cat /data/log",
}


def cgi_dir(tmp_path: Path) -> Path:
    d = tmp_path / "cgi"
    d.mkdir(exist_ok=True)
    for name, text in CGI.items():
        (d / name).write_text(f"#!/bin/sh\necho 'Content-Type: text/plain'\necho\n{text}\n")
        (d / name).chmod(0o755)
    return d


def app(tmp_path: Path, volume: str | dict[str, object], **more: object) -> dict[str, object]:
    return HTTPD | {"user": f"{APP}:{APP}", "idle_timeout": "300ms",
                    "volumes": [volume, f"{cgi_dir(tmp_path)}:/www/cgi-bin:ro"]} | more


def data_dir(tmp_path: Path, owner: int) -> Path:
    data = tmp_path / "data"
    data.mkdir(mode=0o755)
    (data / "log").write_text("before\n")
    for p in (data, data / "log"):
        os.chown(p, owner, owner)
    return data


@pytest.mark.asyncio
@pytest.mark.parametrize("path", ["criu-rpc", "runc"])
@pytest.mark.parametrize("option", ["U", "idmap"])
async def test_a_non_root_app_writes_to_a_host_directory(start, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,  # type: ignore[no-untyped-def]
                                                         option: str, path: str) -> None:
    if path == "runc":
        monkeypatch.setattr(cgroups, "v1_devices", lambda: False)  # what a cgroup-v2-only host says
    elif not cgroups.v1_devices():
        pytest.skip("the direct CRIU path needs the cgroup v1 devices controller")
    # U: root's directory, given to the app; idmap: host user 1000's, kept as it is
    data = data_dir(tmp_path, 0 if option == "U" else APP)
    run = await start({"web": app(tmp_path, f"{data}:/data:{option}")})
    svc = run.act.services["web"]
    assert svc.checkpoint is not None and svc.checkpoint.idmap is not None
    owner = svc.checkpoint.idmap.to_host(APP) if option == "U" else APP
    port = run.port("web")
    assert body(await http_get(port, "/cgi-bin/append?first")) == "written"
    assert body(await http_get(port, "/cgi-bin/create?new-file")) == "written"
    (first,) = svc.instances
    assert first.how == "restore"
    await eventually(lambda: not svc.instances, what="the writer reaped")
    assert body(await http_get(port, "/cgi-bin/append?second")) == "written"
    (second,) = svc.instances
    assert second.how == "restore" and second.sandbox.name != first.sandbox.name
    assert body(await http_get(port, "/cgi-bin/read")) == "before\nfirst\nsecond"
    pid = await second.sandbox.pid()
    mounted = [ln.split() for ln in Path(f"/proc/{pid}/mountinfo").read_text().splitlines() if ln.split()[4] == "/data"]
    assert len(mounted) == 1 and ("idmapped" in mounted[0][5].split(",")) == (option == "idmap"), mounted
    for p in (data, data / "log", data / "new-file"):  # what the app made too: the same owner on the host
        st = p.stat()
        assert (st.st_uid, st.st_gid) == (owner, owner), p
    await run.act.shutdown()
    assert host_resources(run.config.settings.state_dir)["mounts"] == []
    assert (data / "log").read_text() == "before\nfirst\nsecond\n"


@pytest.mark.asyncio
async def test_a_plain_bind_is_bound_as_it_was(start, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The positive control: without U or idmap nothing is chowned; a directory the operator gave the range by
    hand is writable, root's is not (which is what U and idmap are for)."""
    data = data_dir(tmp_path, 0)
    mine = tmp_path / "mine"
    mine.mkdir()
    run = await start({"web": app(tmp_path, f"{data}:/data"),
                       "hand": app(tmp_path, f"{mine}:/data")})
    assert body(await http_get(run.port("web"), "/cgi-bin/read")) == "before"
    assert body(await http_get(run.port("web"), "/cgi-bin/append?x")) == "refused"
    assert (data.stat().st_uid, (data / "log").stat().st_uid) == (0, 0)
    checkpoint = run.act.services["hand"].checkpoint
    assert checkpoint is not None and checkpoint.idmap is not None
    idmap = checkpoint.idmap
    assert mine.stat().st_uid == 0
    os.chown(mine, idmap.to_host(APP), idmap.to_host(APP))  # the old way: chown -R RANGE+1000 by hand
    assert body(await http_get(run.port("hand"), "/cgi-bin/create?by-hand")) == "written"
    assert (mine / "by-hand").stat().st_uid == idmap.to_host(APP)


def test_u_follows_no_link_out_of_the_tree(tmp_path: Path) -> None:
    """Attacker: whoever writes in the volume (the app itself, or a local user) leaves a symlink to /etc/shadow, a
    symlink to /etc, and a hard link to a root file elsewhere on the disk; U, at the build and again when the app's
    uid changes, changes the links' own owners and nothing they point at."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "sub").mkdir()
    (data / "sub" / "file").write_text("x")
    (data / "shadow").symlink_to("/etc/shadow")
    (data / "sub" / "etc").symlink_to("/etc")
    decoy = tmp_path / "decoy"
    decoy.write_text("root's own")
    os.link(decoy, data / "linked")
    before = {p: (os.stat(p).st_uid, os.stat(p).st_gid) for p in ("/etc/shadow", "/etc", "/etc/passwd")}
    services = {"web": app(tmp_path, f"{data}:/data:U")}
    cfg = write_config(tmp_path, services)
    for user in (f"{APP}:{APP}", "1001:1001"):
        services["web"]["user"] = user
        cfg = write_config(tmp_path, services)
        proc = run_cli("checkpoint", "web", "-c", str(cfg), timeout=300)
        assert proc.returncode == 0, proc.stderr
    assert {p: (os.stat(p).st_uid, os.stat(p).st_gid) for p in before} == before
    assert (decoy.stat().st_uid, decoy.stat().st_nlink) == (0, 2)  # the hard link: left alone
    import json

    base = json.loads((tmp_path / "state" / "userns.json").read_text())["web"]
    for p in (data, data / "sub", data / "sub" / "file"):
        assert os.lstat(p).st_uid == base + 1001, p  # given again when the app's uid changed
    for p in (data / "shadow", data / "sub" / "etc"):
        assert os.lstat(p).st_uid == base + 1001, p  # the link itself (lchown), not its target
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("source", "option", "fragments"), [
    ("/etc", "U", ("service 'web': volumes: U refused on /etc is under /etc", "bind a directory made for")),
    ("/etc/ssh", "idmap", ("volumes: idmap refused on /etc/ssh is under /etc",)),
    ("/usr/local/share", "U", ("U refused on /usr/local/share is under /usr",)),
    ("/var/lib/docker/volumes", "U", ("is under /var/lib/docker, the system's or an engine's own files",)),
    ("/home", "U", ("U refused on /home is a system directory",)),
    ("/", "U", ("services.web.volumes", "not a host path to bind")),
    ("STATE/volumes", "U", ("U refused on", "holds or is inside state_dir", "bind a directory outside it")),
    ("STATE/..", "U", ("holds or is inside state_dir",)),
])
def test_u_and_idmap_refuse_what_is_not_the_apps(tmp_path: Path, source: str, option: str,
                                                 fragments: tuple[str, ...]) -> None:
    """Attacker: a volume line that would hand the system's files (or activator's own) to an instance. One line
    each, and nothing of them chowned."""
    source = source.replace("STATE", str(tmp_path / "state"))
    (tmp_path / "state").mkdir()
    before = {p: os.stat(p).st_uid for p in ("/etc", "/etc/ssh", "/usr/local/share", "/home", str(tmp_path))
              if os.path.exists(p)}
    cfg = write_config(tmp_path, {"web": app(tmp_path, f"{source}:/data:{option}")})
    proc = run_cli("checkpoint", "web", "-c", str(cfg), timeout=300)
    assert_one_line_error(proc, *fragments)
    assert {p: os.stat(p).st_uid for p in before} == before


def test_u_refuses_a_directory_another_service_owns(tmp_path: Path) -> None:
    """Attacker: a second service (another tenant) names the first one's U directory, or one inside it, to take
    its files; the positive control: the first service builds, and builds again."""
    data = tmp_path / "data"
    (data / "inner").mkdir(parents=True)
    cfg = write_config(tmp_path, {"a": app(tmp_path, f"{data}:/data:U"),
                                  "b": app(tmp_path, f"{data}/inner:/data:U")})
    first = run_cli("checkpoint", "a", "-c", str(cfg), timeout=300)
    assert first.returncode == 0, first.stderr
    owner = data.stat().st_uid
    proc = run_cli("checkpoint", "b", "-c", str(cfg), timeout=300)
    assert_one_line_error(proc, "service 'b': volumes: U refused on", "service 'a' already owns",
                          "give each service its own directory")
    assert (data / "inner").stat().st_uid == owner  # still a's
    again = run_cli("checkpoint", "a", "--rebuild", "-c", str(cfg), timeout=300)
    assert again.returncode == 0, again.stderr


def test_idmap_on_a_file_system_without_it_is_one_line(tmp_path: Path) -> None:
    """ramfs has no idmapped mounts: said in one line with the fix (use U), not a failed restore."""
    where = tmp_path / "ram"
    where.mkdir()
    subprocess.run(["mount", "-t", "ramfs", "ramfs", str(where)], check=True)
    try:
        cfg = write_config(tmp_path, {"web": app(tmp_path, f"{where}:/data:idmap")})
        proc = run_cli("checkpoint", "web", "-c", str(cfg), timeout=300)
        assert_one_line_error(proc, f"service 'web': volumes: idmap on {where}: the file system of {where} (ramfs) "
                                    "does not support idmapped mounts", "use U instead")
    finally:
        subprocess.run(["umount", str(where)], check=False)
