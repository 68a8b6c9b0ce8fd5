"""OCI image archives (checkpoints/ociarchive.py) without the engine: written and read back, every digest checked,
and a hostile filesystem diff refused before anything is unpacked."""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tarfile
from pathlib import Path

import pytest

from activator.checkpoints import ociarchive
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
    ociarchive.unpack_layer(ociarchive.read(tmp_path / "out.tar"), dest, max_bytes=2**20)
    assert (dest / "checkpoint" / "pages-1.img").read_bytes() == b"x" * 10000
    with pytest.raises(ArchiveError, match="more than 100 bytes"):
        other = tmp_path / "d2"
        other.mkdir()
        ociarchive.unpack_layer(img, other, max_bytes=100)


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
        ociarchive.unpack_tree(archive, tmp_path / "out", range(1000, 2000))
    assert not (tmp_path / "out").exists()


def test_nothing_is_written_through_a_symlink_of_the_archive(tmp_path: Path) -> None:
    archive = _diff(tmp_path, _entry("etc", tarfile.SYMTYPE, linkname="/etc"), _entry("etc/cron.d/x"))
    with pytest.raises(ArchiveError, match="below a symbolic link"):
        ociarchive.unpack_tree(archive, tmp_path / "out", None)


def test_a_whiteout_and_ordinary_files_pass(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("a whiteout is a device node: only root makes one")
    archive = _diff(tmp_path, _entry("gone", tarfile.CHRTYPE, devmajor=0, devminor=0), _entry("etc/hosts"))
    ociarchive.unpack_tree(archive, tmp_path / "out", range(1000, 2000))
    assert (tmp_path / "out" / "etc" / "hosts").stat().st_uid == 1000
    assert stat.S_ISCHR((tmp_path / "out" / "gone").lstat().st_mode)
