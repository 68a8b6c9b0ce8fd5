"""Checkpoint archives against a local attacker and a hostile archive (issue 30 item 7), through the CLI as an
operator runs it, on a real checkpoint of the busybox demo service (runc + CRIU):

- `checkpoint export -o` into a directory where another user (nobody) planted symbolic links at the names root
  writes: the victim file is untouched, root's archive is a new private file; into a directory that user owns,
  or can write without the sticky bit, or through that user's link: refused in one line, nothing written;
- `activator inspect` of an archive whose annotations and file names carry terminal escape sequences (C0, C1,
  bidi overrides): shown escaped, never raw; ordinary text shown as it is (the control).
"""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import tarfile
from pathlib import Path

import pytest

from activator.checkpoints import ociarchive, ocilayer
from tests.conftest import passable, write_config
from tests.daemonproc import ACTIVATOR

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (runc, CRIU, other users' files)")

HELLO = {"image": "activator-demo/busybox:latest", "port": 8080, "command": ["httpd", "-f", "-p", "8080", "-h", "/www"]}
NOBODY = 65534
HOSTILE = ("\x1b]0;owned\x07", "\x1b[2J", "\x9b2J", "\u009d0;x\u009c", "\u202e", "\u2066")


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*ACTIVATOR, *argv], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(services file, an exported archive of its checkpoint)."""
    root = tmp_path_factory.mktemp("archive-attacks")
    passable(root)  # instances in a user namespace pass through to their files (userns.check_passable)
    cfg = write_config(root, {"hello": HELLO})
    r = _run("checkpoint", "hello", "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    archive = root / "hello.tar"
    r = _run("checkpoint", "export", "hello", "-o", str(archive), "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    return cfg, archive


def _victim(tmp_path: Path) -> Path:
    victim = tmp_path / "shadow"
    victim.write_text("root:$6$secret:20000:0:99999:7:::\n")
    os.chmod(victim, 0o640)
    return victim


def test_export_does_not_follow_links_planted_in_a_sticky_directory(built: tuple[Path, Path],
                                                                    tmp_path: Path) -> None:
    cfg, _ = built
    victim = _victim(tmp_path)
    shared = tmp_path / "tmp"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as /tmp
    for name in (".hello.tar.partial", "hello.tar"):  # the old fixed partial name, and the archive's own
        os.symlink(victim, shared / name)
        os.lchown(shared / name, NOBODY, NOBODY)
    r = _run("checkpoint", "export", "hello", "-o", str(shared / "hello.tar"), "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    assert victim.read_text() == "root:$6$secret:20000:0:99999:7:::\n"
    assert stat.S_IMODE(victim.stat().st_mode) == 0o640 and victim.stat().st_uid == 0
    st = (shared / "hello.tar").lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    assert ociarchive.read(shared / "hello.tar").annotations["org.criu.checkpoint.container.name"] == "hello"
    assert sorted(p.name for p in shared.iterdir()) == [".hello.tar.partial", "hello.tar"]  # nothing else made


@pytest.mark.parametrize("how", ["owned by nobody", "writable by all, not sticky", "through nobody's link"])
def test_export_where_another_user_could_swap_the_file_is_refused(built: tuple[Path, Path], tmp_path: Path,
                                                                  how: str) -> None:
    cfg, _ = built
    victim = _victim(tmp_path)
    place = tmp_path / "place"
    place.mkdir()
    out = place / "hello.tar"
    if how == "owned by nobody":
        os.chown(place, NOBODY, NOBODY)
        says = f"{place} is owned by uid {NOBODY}, not root"
    elif how == "writable by all, not sticky":
        os.chmod(place, 0o777)
        says = f"{place} is writable by other users (mode 777) and not sticky"
    else:
        os.symlink(victim.parent, tmp_path / "link")  # nobody's link, pointing at a root-owned directory
        os.lchown(tmp_path / "link", NOBODY, NOBODY)
        out = tmp_path / "link" / "shadow"  # would replace the victim by name
        says = f"{tmp_path / 'link'} is a symbolic link owned by uid {NOBODY}"
    r = _run("checkpoint", "export", "hello", "-o", str(out), "-c", str(cfg))
    assert r.returncode == 1 and says in r.stderr, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr
    assert victim.read_text() == "root:$6$secret:20000:0:99999:7:::\n"
    assert list(place.iterdir()) == []


def _hostile_copy(src: Path, dst: Path, work: Path, annotations: dict[str, str], names: list[str]) -> None:
    """The archive again, its layer with extra files of these names and these annotations added."""
    image = ociarchive.read(src)
    (work / "layer").mkdir(parents=True)
    ocilayer.unpack_layer(image, work / "layer", max_bytes=2**30)
    with tarfile.open(work / "layer.tar", "w", format=tarfile.PAX_FORMAT) as t:
        for p in sorted((work / "layer").iterdir()):
            t.add(p, p.name)
        for name in names:
            info = tarfile.TarInfo(name)
            info.size = 2
            t.addfile(info, io.BytesIO(b"hi"))
    ociarchive.write(dst, work / "layer.tar", image.annotations | annotations, ref=image.ref, arch="amd64",
                     created=image.config["created"])


def test_inspect_shows_an_archives_escape_sequences_escaped(built: tuple[Path, Path], tmp_path: Path) -> None:
    cfg, archive = built
    ordinary = "built by the ops team — café 東京, ticket #42"
    own = "org.activator.checkpoint."
    hostile = tmp_path / "hostile.tar"
    _hostile_copy(archive, hostile, tmp_path / "w1", {
        own + "note": ordinary,
        own + "evil": "".join(HOSTILE) + "fake line",
        "org.criu.checkpoint.criu.version": "4.2.1\x1b]8;;http://attacker/\x07click\x1b]8;;\x07",
    }, ["evil\u202etxt.exe", "csi\u009b2J", "nel\u0085x"])
    r = _run("inspect", str(hostile), "-c", str(cfg))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for raw in (*HOSTILE, "\x07", "\x85"):
        assert raw not in out, (raw, out)
    assert "\\x1b]0;owned\\x07" in out and "\\x9b2J" in out and "\\u202e" in out and "\\u2066" in out
    assert "evil\\u202etxt.exe" in out and "csi\\x9b2J" in out and "nel\\x85x" in out
    assert "4.2.1\\x1b]8;;http://attacker/\\x07click" in out
    assert ordinary in out  # the control: ordinary text, non-ASCII included, as it is
    json_out = _run("inspect", str(hostile), "--json", "-c", str(cfg)).stdout
    assert not any(raw in json_out for raw in HOSTILE)
    assert json.loads(json_out)["annotations"][own + "note"] == ordinary


def test_inspect_of_a_layer_member_with_a_control_character_is_one_escaped_line(built: tuple[Path, Path],
                                                                                tmp_path: Path) -> None:
    cfg, archive = built
    hostile = tmp_path / "hostile.tar"
    _hostile_copy(archive, hostile, tmp_path / "w2", {}, ["x\x1b]0;owned\x07\nforged: ok"])
    r = _run("inspect", str(hostile), "-c", str(cfg))
    # inspect still shows what the manifest says, and says in one escaped line why the contents are not shown
    assert r.returncode == 0, r.stderr
    said = [line for line in r.stdout.splitlines() if line.startswith("  contents   not shown:")]
    assert len(said) == 1 and "a control character in its name" in said[0], r.stdout
    assert "\x1b" not in r.stdout + r.stderr and "\x07" not in r.stdout + r.stderr
