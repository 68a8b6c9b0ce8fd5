"""maphazard.find on hand-made decoded dumps (the shape pycriu gives) and layers in a temporary directory: a shared
jemalloc by its name, a static one by its marker in an executable mapping, and an image author's layer never
read through a link, a FIFO or past MAX_SCAN."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from activator.checkpoints import maphazard, store

MARKER = b"<jemalloc>: "


def dump(tmp: Path, mapped: list[tuple[str, int]]) -> Path:
    """An images directory whose one process maps these files (path, prot), as pycriu would decode it."""
    images = tmp / "criu"
    images.mkdir()
    docs = {
        "pstree.img": {"entries": [{"pid": 1, "ppid": 0}]},
        "files.img": {"entries": [{"id": i + 1, "type": "REG", "reg": {"name": name}}
                                  for i, (name, _) in enumerate(mapped)]},
        "mm-1.img": {"entries": [{"vmas": [
            {"start": hex(0x1000 * (i + 1)), "end": hex(0x1000 * (i + 2)), "prot": prot,
             "status": store.VMA_FILE_PRIVATE | 1, "shmid": i + 1} for i, (_, prot) in enumerate(mapped)
        ] + [{"start": "0x90000", "end": "0x91000", "prot": 3, "status": 1 | (1 << 2), "shmid": 0}]}]},
    }
    for name in docs:
        (images / name).write_bytes(b"")
    images_docs[images] = docs
    return images


images_docs: dict[Path, dict[str, Any]] = {}


@pytest.fixture(autouse=True)
def fake_pycriu(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(store, "_load_img", lambda path: images_docs[path.parent][path.name])


def layer(tmp: Path, name: str, files: dict[str, bytes]) -> Path:
    root = tmp / name
    for path, content in files.items():
        (root / path).parent.mkdir(parents=True, exist_ok=True)
        (root / path).write_bytes(content)
    root.mkdir(exist_ok=True)
    return root


def test_a_shared_jemalloc_is_found_by_its_name(tmp_path: Path) -> None:
    images = dump(tmp_path, [("/usr/bin/redis-check-rdb", 5), ("/usr/lib/x86_64-linux-gnu/libjemalloc.so.2", 5)])
    assert maphazard.find(images, []) == "jemalloc (/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)"


def test_a_static_jemalloc_is_found_in_an_executable_mapping_from_the_topmost_layer(tmp_path: Path) -> None:
    images = dump(tmp_path, [("/usr/local/bin/redis-server", 5), ("/usr/lib/libc.so.6", 5)])
    image = layer(tmp_path, "image", {"usr/local/bin/redis-server": b"\x7fELF" + b"x" * 100 + MARKER + b"y" * 10,
                                      "usr/lib/libc.so.6": b"\x7fELF"})
    assert maphazard.find(images, [layer(tmp_path, "diff", {}), image]) == \
        "jemalloc, linked into /usr/local/bin/redis-server"
    # the diff layer's copy is what the app ran: a rebuilt binary without it hides the image's
    diff = layer(tmp_path, "diff2", {"usr/local/bin/redis-server": b"\x7fELF plain"})
    assert maphazard.find(images, [diff, image]) == ""


def test_glibc_and_a_jvm_are_not_hazards(tmp_path: Path) -> None:
    images = dump(tmp_path, [("/usr/lib/jvm/lib/server/libjvm.so", 5), ("/usr/lib/libc.so.6", 5),
                             ("/usr/lib/jvm/lib/server/classes.jsa", 3)])
    root = layer(tmp_path, "image", {"usr/lib/jvm/lib/server/libjvm.so": b"\x7fELF" + b"j" * 5000,
                                     "usr/lib/libc.so.6": b"\x7fELF", "usr/lib/jvm/lib/server/classes.jsa": MARKER})
    assert maphazard.find(images, [root]) == ""  # the marker in a data mapping is not code


def test_the_marker_is_found_across_a_read_boundary_and_not_past_max_scan(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(maphazard, "CHUNK", 16)
    f = tmp_path / "bin"
    f.write_bytes(b"a" * 10 + MARKER + b"b" * 40)  # the marker straddles bytes 16 and 32
    assert maphazard._contains(f, MARKER, set(), [maphazard.MAX_TOTAL_SCAN])
    monkeypatch.setattr(maphazard, "MAX_SCAN", 16)
    # bounded: an author's 10 GB file is not read to its end
    assert not maphazard._contains(f, MARKER, set(), [maphazard.MAX_TOTAL_SCAN])


def test_an_image_authors_layer_is_never_read_through_a_link_or_a_fifo(tmp_path: Path) -> None:
    """A layer is untrusted: a link out of it would read a host file, a FIFO would block the build."""
    outside = tmp_path / "host-secret"
    outside.write_bytes(MARKER)
    root = layer(tmp_path, "image", {})
    (root / "usr" / "bin").mkdir(parents=True)
    os.symlink(outside, root / "usr" / "bin" / "app")  # the file itself a link
    os.symlink(tmp_path, root / "opt")  # a directory on the way a link
    os.mkfifo(root / "usr" / "bin" / "fifo")
    for name in ("/usr/bin/app", "/opt/host-secret", "/usr/bin/fifo", "/usr/../host-secret"):
        assert maphazard._in_layers(name, [root]) is None, name
    images = dump(tmp_path, [("/usr/bin/app", 5), ("/opt/host-secret", 5), ("/usr/bin/fifo", 5)])
    assert maphazard.find(images, [root]) == ""
    # the positive control: the same bytes as a regular file in the layer are found
    (root / "usr" / "bin" / "app").unlink()
    (root / "usr" / "bin" / "app").write_bytes(MARKER)
    assert maphazard.find(images, [root]) == "jemalloc, linked into /usr/bin/app"


def counting_reads(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    read, got = os.read, [0]

    def counted(fd: int, n: int) -> bytes:
        block = read(fd, n)
        got[0] += len(block)
        return block
    monkeypatch.setattr(os, "read", counted)
    return got


def test_one_file_under_many_names_is_read_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """33.2: the names are the dump's: an app maps one big file through hard links it made in its writable layer,
    or an imported files.img spells one path many ways; each name read MAX_SCAN of the same file."""
    size = 64 * 1024
    root = layer(tmp_path, "diff", {"app/big": b"\x7fELF" + b"z" * size})
    for i in range(200):
        os.link(root / "app" / "big", root / "app" / f"l{i}")
    names = [f"/app/l{i}" for i in range(200)] + ["/app/big", "//app/big", "/./app/big", "/app//./big"]
    images = dump(tmp_path, [(n, 5) for n in names])
    got = counting_reads(monkeypatch)
    assert maphazard.find(images, [root]) == ""
    assert 0 < got[0] <= size + 4, got  # one file's bytes, once
    # control: a marker in a file of its own after all those names is still found
    (root / "zz").write_bytes(b"\x7fELF" + MARKER)
    (tmp_path / "2").mkdir()
    images = dump(tmp_path / "2", [(n, 5) for n in names] + [("/zz", 5)])
    assert maphazard.find(images, [root]) == "jemalloc, linked into /zz"


def test_more_executables_than_the_total_bound_are_restored_by_copy(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """33.2: distinct files are read up to MAX_TOTAL_SCAN in all; past it the checkpoint is taken as a hazard (by
    copy: only the tenant that shipped them pays)."""
    monkeypatch.setattr(maphazard, "MAX_TOTAL_SCAN", 3 * 4096)
    monkeypatch.setattr(maphazard, "CHUNK", 1024)
    root = layer(tmp_path, "image", {f"bin/f{i}": b"\x7fELF" + b"q" * 4096 for i in range(20)})
    images = dump(tmp_path, [(f"/bin/f{i}", 5) for i in range(20)])
    got = counting_reads(monkeypatch)
    assert maphazard.find(images, [root]).startswith("its app maps more than ")
    assert got[0] <= 3 * 4096, got
    # control: within the bound, the same files are looked through and found clean
    monkeypatch.setattr(maphazard, "MAX_TOTAL_SCAN", 100 * 4096)
    (tmp_path / "2").mkdir()
    images = dump(tmp_path / "2", [(f"/bin/f{i}", 5) for i in range(20)])
    assert maphazard.find(images, [root]) == ""


def test_a_path_the_app_chose_is_one_printable_line_in_the_hazard(tmp_path: Path) -> None:
    """33.3: the hazard names a path from the dump (any bytes but NUL and '/', for a build: the app's own files);
    it goes into the operator's log and `status`, where a newline would forge a line of its own."""
    forged = "\nservice=db level=ERROR CRIU restore failed\r\x1b[2K"
    images = dump(tmp_path, [(f"/tmp/x{forged}/libjemalloc.so.2", 5)])
    got = maphazard.find(images, [])
    assert got.startswith("jemalloc (/tmp/x") and got.endswith("/libjemalloc.so.2)"), got
    assert got.isprintable() and "\\nservice=db" in got, got
    said = maphazard.said(f"jemalloc (/tmp/x{forged}/libjemalloc.so.2)")  # a record from before the escaping
    assert said.isprintable() and said.startswith("its app has jemalloc (/tmp/x\\n"), said
    # control: an ordinary path is named as it is, and a long one within bounds
    (tmp_path / "2").mkdir()
    images = dump(tmp_path / "2", [("/usr/lib/libjemalloc.so.2", 5)])
    assert maphazard.find(images, []) == "jemalloc (/usr/lib/libjemalloc.so.2)"
    (tmp_path / "3").mkdir()
    images = dump(tmp_path / "3", [("/" + "d" * 3000 + "/libjemalloc.so.2", 5)])
    assert len(maphazard.find(images, [])) < maphazard.MAX_SHOWN + 20
