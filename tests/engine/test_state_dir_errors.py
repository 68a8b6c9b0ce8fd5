"""A state_dir that cannot be used (a file in the way, a read-only or full file system): one line naming the
key and the fix, and nothing left running, mounted or half-written; a full disk never costs the old checkpoint."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from activator.runtime import rootfs
from tests.conftest import ECHO, host_resources, write_config

from .test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.engine


@contextlib.contextmanager
def tmpfs(where: Path, *options: str) -> Iterator[Path]:
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", ",".join(options or ("size=64m",)), "tmpfs", str(where)],
                   check=True)
    try:
        yield where
    finally:
        for point in rootfs.mounts_under(where):
            rootfs.unmount(point)
        subprocess.run(["umount", "-l", str(where)], check=False)


def test_state_dir_that_is_a_file(tmp_path: Path) -> None:
    (tmp_path / "state").write_text("not a directory")
    cfg = write_config(tmp_path, {"echo": ECHO})
    proc = run_cli("run", "-c", str(cfg))
    assert_one_line_error(proc, str(cfg), "settings.state_dir", "is not a directory", "pick another path")


def test_state_dir_on_a_read_only_file_system(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "ro", "ro", "size=1m") as ro:
        cfg = write_config(tmp_path, {"echo": ECHO}, state_dir=str(ro / "state"))
        proc = run_cli("checkpoint", "echo", "-c", str(cfg))
        assert_one_line_error(proc, str(cfg), "settings.state_dir", "read-only file system", "writable path")


def test_a_full_disk_during_a_checkpoint_build_loses_nothing(tmp_path: Path) -> None:
    with tmpfs(tmp_path / "small", "size=64m") as small:
        state = small / "state"
        cfg = write_config(tmp_path, {"echo": ECHO}, state_dir=str(state))
        first = run_cli("checkpoint", "echo", "-c", str(cfg))
        assert first.returncode == 0, first.stderr
        meta = (state / "checkpoints" / "echo" / "meta.json").read_bytes()
        # Leave a few KiB: enough to start, not enough to dump the app's memory.
        filler = small / "filler"
        subprocess.run(["fallocate", "-l", str(64 * 2**20), str(filler)], check=False, capture_output=True)
        with contextlib.suppress(OSError), open(filler, "ab") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
        proc = run_cli("checkpoint", "echo", "--rebuild", "-c", str(cfg))
        assert_one_line_error(proc, "service 'echo'", "no space left on the device of state_dir", "free some space")
        res = host_resources(state)
        assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == []
        assert not list((state / "checkpoints").glob(".build-*"))
        assert (state / "checkpoints" / "echo" / "meta.json").read_bytes() == meta  # the old one is intact
        filler.unlink()
        again = run_cli("checkpoint", "echo", "-c", str(cfg))
        assert again.returncode == 0 and "checkpoint is current" in again.stdout, again.stderr
