"""OCI image archives (checkpoints/ociarchive.py) without the engine: written and read back, every digest checked,
and a hostile filesystem diff refused before anything is unpacked."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import stat
import tarfile
from pathlib import Path
from typing import Any

import pytest

from activator.checkpoints import ociarchive, ocilayer, rootfsdiff
from activator.checkpoints.ociarchive import ArchiveError

pytestmark = pytest.mark.skipif(shutil.which("zstd") is None, reason="needs zstd")


def _layer(tmp: Path, files: dict[str, bytes]) -> Path:
    path = tmp / "layer.tar"
    with tarfile.open(path, "w") as t:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
    return path


def test_written_and_read_back(tmp_path: Path) -> None:
    layer = _layer(tmp_path, {"activator.json": b"{}", "checkpoint/pages-1.img": b"x" * 10000})
    img = ociarchive.write(tmp_path / "out.tar", layer, {"org.criu.checkpoint.engine.name": "activator"},
                           ref="ck-1", arch="amd64", created="2026-12-01T00:00:00Z")
    assert img.ref == "ck-1" and img.annotations["org.criu.checkpoint.engine.name"] == "activator"
    assert img.layers[0].media_type == ociarchive.LAYER_ZSTD
    assert (tmp_path / "out.tar").stat().st_mode & 0o077 == 0  # the app's memory: private
    dest = tmp_path / "dest"
    dest.mkdir()
    ocilayer.unpack_layer(ociarchive.read(tmp_path / "out.tar"), dest, max_bytes=2**20)
    assert (dest / "checkpoint" / "pages-1.img").read_bytes() == b"x" * 10000
    with pytest.raises(ArchiveError, match="more than 100 bytes"):
        other = tmp_path / "d2"
        other.mkdir()
        ocilayer.unpack_layer(img, other, max_bytes=100)


def test_an_altered_manifest_is_refused(tmp_path: Path) -> None:
    layer = _layer(tmp_path, {"a": b"1"})
    img = ociarchive.write(tmp_path / "out.tar", layer, {"k": "v"}, ref="r", arch="amd64", created="x")
    # Rewrite index.json to point at a manifest digest that does not match the blob's bytes.
    with tarfile.open(tmp_path / "out.tar") as t:
        members = [(m, t.extractfile(m).read() if m.isfile() else None) for m in t.getmembers()]  # type: ignore[union-attr]
    with tarfile.open(tmp_path / "bad.tar", "w") as t:
        for m, data in members:
            if m.name == "index.json":
                doc = json.loads(data or b"")
                doc["manifests"][0]["digest"] = img.layers[0].digest  # a blob that exists, but is not a manifest
                data = json.dumps(doc).encode()
                m.size = len(data)
            t.addfile(m, io.BytesIO(data) if data is not None else None)
    with pytest.raises(ArchiveError):
        ociarchive.read(tmp_path / "bad.tar")
    with pytest.raises(ArchiveError, match=r"not an OCI image archive|not a readable"):
        (tmp_path / "junk.tar").write_bytes(b"not a tar at all" * 100)
        ociarchive.read(tmp_path / "junk.tar")


def _diff(tmp: Path, *entries: tarfile.TarInfo) -> Path:
    path = tmp / "diff.tar"
    with tarfile.open(path, "w") as t:
        for e in entries:
            t.addfile(e, io.BytesIO(b"") if e.isreg() else None)
    return path


def _entry(name: str, kind: bytes = tarfile.REGTYPE, uid: int = 1000, **kw: object) -> tarfile.TarInfo:
    e = tarfile.TarInfo(name)
    e.type, e.uid, e.gid = kind, uid, uid
    for k, v in kw.items():
        setattr(e, k, v)
    return e


@pytest.mark.parametrize(("entry", "says"), [
    (_entry("../escape"), "outside the tree"),
    (_entry("/etc/passwd"), "outside the tree"),
    (_entry("dev/sda", tarfile.BLKTYPE), "kind a filesystem diff does not hold"),
    (_entry("dev/mem", tarfile.CHRTYPE, devmajor=1, devminor=1), "a device node"),
    (_entry("link", tarfile.LNKTYPE, linkname="../../etc/shadow"), "hard link out of the tree"),
    (_entry("setuid-root", uid=0, mode=0o4755), "outside the exporter's user namespace"),
])
def test_a_hostile_diff_is_refused_before_anything_is_unpacked(tmp_path: Path, entry: tarfile.TarInfo,
                                                               says: str) -> None:
    archive = _diff(tmp_path, _entry("ok"), entry)
    with pytest.raises(ArchiveError, match=says):
        rootfsdiff.unpack_tree(archive, tmp_path / "out", range(1000, 2000))
    assert not (tmp_path / "out").exists()


def test_nothing_is_written_through_a_symlink_of_the_archive(tmp_path: Path) -> None:
    archive = _diff(tmp_path, _entry("etc", tarfile.SYMTYPE, linkname="/etc"), _entry("etc/cron.d/x"))
    with pytest.raises(ArchiveError, match="below a symbolic link"):
        rootfsdiff.unpack_tree(archive, tmp_path / "out", None)


def test_a_whiteout_and_ordinary_files_pass(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a whiteout is a device node: only root makes one")
    archive = _diff(tmp_path, _entry("gone", tarfile.CHRTYPE, devmajor=0, devminor=0), _entry("etc/hosts"))
    rootfsdiff.unpack_tree(archive, tmp_path / "out", range(1000, 2000))
    assert (tmp_path / "out" / "etc" / "hosts").stat().st_uid == 1000
    assert stat.S_ISCHR((tmp_path / "out" / "gone").lstat().st_mode)


# --- the layer: regular files and directories only, bounded as it is decompressed (issue 30 item 7) ---------


def _image_of(tmp: Path, members: list[tuple[tarfile.TarInfo, bytes | None]]) -> ociarchive.Image:
    """An archive whose layer holds exactly these members (written with tarfile, nothing checked on the way)."""
    layer = tmp / "hostile-layer.tar"
    with tarfile.open(layer, "w", format=tarfile.PAX_FORMAT) as t:
        for info, data in members:
            if data is not None:
                info.size = len(data)
            t.addfile(info, io.BytesIO(data) if data is not None else None)
    return ociarchive.write(tmp / "hostile.tar", layer, {"k": "v"}, ref="r", arch="amd64", created="x")


def _file(name: str, data: bytes = b"x") -> tuple[tarfile.TarInfo, bytes]:
    return tarfile.TarInfo(name), data


def _of(name: str, kind: bytes, **kw: object) -> tuple[tarfile.TarInfo, None]:
    info = tarfile.TarInfo(name)
    info.type = kind
    for k, v in kw.items():
        setattr(info, k, v)
    return info, None


NORMAL = [_of("checkpoint", tarfile.DIRTYPE, mode=0o755), _file("checkpoint/pages-1.img", b"p" * 5000),
          _file("checkpoint/inventory.img"), _file("rootfs-diff.tar", b"t" * 1024), _file("activator.json", b"{}")]


def test_a_normal_checkpoint_layer_unpacks(tmp_path: Path) -> None:
    """The control: what transfer.export puts in a layer comes out as it went in."""
    dest = tmp_path / "dest"
    dest.mkdir()
    ocilayer.unpack_layer(_image_of(tmp_path, NORMAL), dest, max_bytes=2**20)
    assert (dest / "checkpoint" / "pages-1.img").read_bytes() == b"p" * 5000
    assert (dest / "activator.json").read_bytes() == b"{}" and (dest / "rootfs-diff.tar").stat().st_size == 1024
    assert sorted(p.name for p in dest.iterdir()) == ["activator.json", "checkpoint", "rootfs-diff.tar"]


@pytest.mark.parametrize(("hostile", "says"), [
    (_of("checkpoint/evil", tarfile.SYMTYPE, linkname="/etc"), "is a symbolic link"),
    (_of("checkpoint/rel", tarfile.SYMTYPE, linkname="../../../../etc/passwd"), "is a symbolic link"),
    (_of("checkpoint/hard", tarfile.LNKTYPE, linkname="activator.json"), "is a hard link"),
    (_of("checkpoint/null", tarfile.CHRTYPE, devmajor=1, devminor=3), "is a device"),
    (_of("checkpoint/sda", tarfile.BLKTYPE, devmajor=8, devminor=0), "is a device"),
    (_of("checkpoint/fifo", tarfile.FIFOTYPE), "is a fifo"),
    (_file("../escape"), "not a plain name"),
    (_file("checkpoint/../../escape"), "not a plain name"),
    (_file("/etc/cron.d/x"), "not a plain name"),
    (_file("checkpoint//x"), "not a plain name"),
    (_file("checkpoint/a\nb"), "a control character"),
    (_file("checkpoint/a\x1b]0;x\x07"), "a control character"),
    (_file("./activator.json"), "appears twice"),
    (_file("checkpoint/inventory.img"), "appears twice"),
])
def test_a_hostile_layer_member_is_refused_before_anything_is_unpacked(
        tmp_path: Path, hostile: tuple[tarfile.TarInfo, bytes | None], says: str) -> None:
    dest = tmp_path / "dest"
    dest.mkdir()
    image = _image_of(tmp_path, [*NORMAL, hostile])
    with pytest.raises(ArchiveError, match=says) as e:
        ocilayer.unpack_layer(image, dest, max_bytes=2**20)
    assert "\n" not in str(e.value) and "\x1b" not in str(e.value)
    assert list(dest.iterdir()) == []  # checked before anything was written
    assert not (tmp_path / "escape").exists()


def test_a_nul_in_a_name_is_refused(tmp_path: Path) -> None:
    """tarfile cuts a ustar name at NUL; a PAX path record may carry one. Either way nothing is unpacked."""
    info = tarfile.TarInfo("checkpoint/x")
    info.pax_headers = {"path": "checkpoint/a\x00/../../../escape"}
    dest = tmp_path / "dest"
    dest.mkdir()
    image = _image_of(tmp_path, [*NORMAL, (info, b"x")])
    with pytest.raises(ArchiveError):
        ocilayer.unpack_layer(image, dest, max_bytes=2**20)
    assert list(dest.iterdir()) == [] and not (tmp_path / "escape").exists()


def test_too_many_members_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "two").mkdir()
    five = _image_of(tmp_path / "one", NORMAL)
    six = _image_of(tmp_path / "two", [*NORMAL, _file("one-more")])
    monkeypatch.setattr(ociarchive, "MAX_MEMBERS", 5)
    (tmp_path / "d1").mkdir()
    ocilayer.unpack_layer(five, tmp_path / "d1", max_bytes=2**20)  # 5: the limit itself passes
    (tmp_path / "d2").mkdir()
    with pytest.raises(ArchiveError, match="more than 5 members"):
        ocilayer.unpack_layer(six, tmp_path / "d2", max_bytes=2**20)
    with pytest.raises(ArchiveError, match="more than 5 members"):  # the archive itself: 8 members
        ociarchive.read(tmp_path / "one" / "hostile.tar")


def test_a_zstd_bomb_is_stopped_at_the_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A few KiB of zstd that inflate to 16 MiB, unpacked with a 1 MiB bound: refused, and no more than the bound
    (plus one read) was ever written. Control: the same bomb with a bound above its size unpacks. (16 times the
    bound shows it stops at the bound; more would only take longer to write and to unpack in the control.)"""
    layer = tmp_path / "zeros.tar"
    with tarfile.open(layer, "w") as t:
        info = tarfile.TarInfo("checkpoint/pages-1.img")
        info.size = 16 * 2**20
        with open("/dev/zero", "rb") as zero:
            t.addfile(info, zero)
    image = ociarchive.write(tmp_path / "bomb.tar", layer, {"k": "v"}, ref="r", arch="amd64", created="x")
    assert image.layers[0].size < 16 * 2**10  # small on the wire
    written: list[int] = []  # the decompressed layer's size on disk when the blob's digest is checked
    check = ocilayer._check_digest

    def spy(*args: Any) -> None:
        written.extend(p.stat().st_size for p in tmp_path.glob(".layer-*/layer.tar"))
        check(*args)

    dest = tmp_path / "dest"
    dest.mkdir()
    monkeypatch.setattr(ocilayer, "_check_digest", spy)
    with pytest.raises(ArchiveError, match="unpacks to more than 1048576 bytes"):
        ocilayer.unpack_layer(image, dest, max_bytes=2**20)
    assert written and max(written) <= 2**20, written  # stopped at the bound, not filled and then refused
    assert list(dest.iterdir()) == [] and not list(tmp_path.glob(".layer-*"))
    ocilayer.unpack_layer(image, dest, max_bytes=17 * 2**20)
    assert (dest / "checkpoint" / "pages-1.img").stat().st_size == 16 * 2**20


def test_an_altered_bomb_is_refused_as_altered(tmp_path: Path) -> None:
    """The digest is checked over the whole blob even when the output stopped early."""
    layer = tmp_path / "zeros.tar"
    with tarfile.open(layer, "w") as t:
        info = tarfile.TarInfo("big")
        info.size = 8 * 2**20
        with open("/dev/zero", "rb") as zero:
            t.addfile(info, zero)
    image = ociarchive.write(tmp_path / "bomb.tar", layer, {"k": "v"}, ref="r", arch="amd64", created="x")
    data = bytearray((tmp_path / "bomb.tar").read_bytes())
    m = image.members["blobs/sha256/" + image.layers[0].digest.partition(":")[2]]
    data[m.offset_data + m.size - 2] ^= 0xFF  # the end of the blob: after the bound is reached
    (tmp_path / "bomb.tar").write_bytes(bytes(data))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(ArchiveError, match="does not match its digest"):
        ocilayer.unpack_layer(ociarchive.read(tmp_path / "bomb.tar"), dest, max_bytes=2**20)


# --- writing: only in a directory nobody else can change, never through a planted link -------------------------


def test_an_archive_is_not_written_through_a_planted_symlink(tmp_path: Path) -> None:
    """A sticky, world-writable directory (as /tmp) where another user planted links at the names root would
    have used (the old fixed partial name, and the archive's own name): the victim files are untouched, the
    links are replaced by root's own private file. Control: the archive reads back."""
    victim = tmp_path / "shadow"
    victim.write_text("root:secret\n")
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)
    other = 65534
    for name in (".out.tar.partial", "out.tar"):
        os.symlink(victim, shared / name)
        os.lchown(shared / name, other, other)
    layer = _layer(tmp_path, {"a": b"1"})
    img = ociarchive.write(shared / "out.tar", layer, {"k": "v"}, ref="r", arch="amd64", created="x")
    assert victim.read_text() == "root:secret\n"
    st = (shared / "out.tar").lstat()
    assert stat.S_ISREG(st.st_mode) and st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600
    assert img.annotations == {"k": "v"}
    assert sorted(p.name for p in shared.iterdir()) == [".out.tar.partial", "out.tar"]  # nothing of ours left


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: other users' directories and links")
@pytest.mark.parametrize("how", ["owned by another user", "writable by others", "link by another user"])
def test_an_archive_is_refused_where_another_user_could_swap_it(tmp_path: Path, how: str) -> None:
    layer = _layer(tmp_path, {"a": b"1"})
    place = tmp_path / "place"
    place.mkdir()
    out = place / "out.tar"
    if how == "owned by another user":
        os.chown(place, 65534, 65534)
        says = "is owned by uid 65534, not root"
    elif how == "writable by others":
        os.chmod(place, 0o777)
        says = "is writable by other users (mode 777) and not sticky"
    else:
        real = tmp_path / "real"
        real.mkdir()
        os.symlink(real, tmp_path / "via")
        os.lchown(tmp_path / "via", 65534, 65534)
        out = tmp_path / "via" / "out.tar"
        says = "is a symbolic link owned by uid 65534"
    with pytest.raises(ArchiveError, match=re.escape(says)) as e:
        ociarchive.write(out, layer, {"k": "v"}, ref="r", arch="amd64", created="x")
    assert "\n" not in str(e.value)
    assert not out.exists() and not [p for p in place.iterdir() if p.name != "out.tar"]


def test_a_root_owned_link_and_private_directories_are_fine(tmp_path: Path) -> None:
    """The control: a path through root's own link to root's own 0700 directory is written as asked."""
    real = tmp_path / "real"
    real.mkdir(mode=0o700)
    os.symlink("real", tmp_path / "via")
    layer = _layer(tmp_path, {"a": b"1"})
    ociarchive.write(tmp_path / "via" / "out.tar", layer, {"k": "v"}, ref="r", arch="amd64", created="x")
    assert (real / "out.tar").is_file() and [p.name for p in real.iterdir()] == ["out.tar"]
    with pytest.raises(ArchiveError, match="no such directory"):
        ociarchive.write(tmp_path / "nope" / "out.tar", layer, {"k": "v"}, ref="r", arch="amd64", created="x")
