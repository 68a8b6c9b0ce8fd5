"""A full state_dir is one line wherever a command meets it (a state file, a dump, an unpacked layer), naming
state_dir and the fix, exit 1 (never the "internal error" 70), with nothing left running or mounted and the
checkpoint that was there still there. Table-driven over the commands an operator runs."""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ECHO, host_resources, write_config

from .test_cli import assert_one_line_error, run_cli
from .test_state_dir_errors import tmpfs

pytestmark = pytest.mark.engine

TRUST = {"checkpoint_trust": {"insecure_unsigned": True}}  # the archive below is this host's own, unsigned


@pytest.fixture(scope="module")
def full(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path, Path]]:
    """(the tmpfs, its state_dir with a built checkpoint, an exported archive outside it), filled to the brim."""
    from tests.conftest import passable

    root = passable(tmp_path_factory.mktemp("full"))
    with tmpfs(root / "small", "size=64m") as small:
        cfg = write_config(root, {"echo": ECHO}, state_dir=str(small / "state"), **TRUST)
        built = run_cli("checkpoint", "echo", "-c", str(cfg), timeout=300)
        assert built.returncode == 0, built.stderr
        archive = root / "echo.tar"
        exported = run_cli("checkpoint", "export", "echo", "-c", str(cfg), "-o", str(archive), timeout=300)
        assert exported.returncode == 0, exported.stderr
        filler = small / "filler"
        subprocess.run(["fallocate", "-l", str(64 * 2**20), str(filler)], check=False, capture_output=True)
        with contextlib.suppress(OSError), open(filler, "ab") as f:
            for _ in range(64 * 2**20 // 4096):  # bounded: the tmpfs is 64 MiB
                f.write(b"\0" * 4096)
                f.flush()
        yield small, small / "state", archive


SAID = ("no space left on the device of state_dir", "free some space")


@pytest.mark.parametrize(("name", "argv", "changed", "fragments"), [
    ("validate", ["validate", "{cfg}"], {}, ("settings.state_dir: no space left on the device of state_dir",
                                             "`run` cannot start")),
    ("checkpoint build", ["checkpoint", "echo", "--rebuild", "-c", "{cfg}"], {}, SAID),
    ("checkpoint import", ["checkpoint", "import", "{archive}", "-c", "{cfg}"], {}, SAID),
    ("run, a rebuild due", ["run", "-c", "{cfg}"], {"environment": ["CHANGED=1"]}, SAID),
    ("run, a current checkpoint", ["run", "-c", "{cfg}"], {}, SAID),
    ("run, a new state_dir", ["run", "-c", "{cfg}"], {"state_dir": "fresh"}, SAID),
    ("checkpoint, a new state_dir", ["checkpoint", "echo", "-c", "{cfg}"], {"state_dir": "fresh"}, SAID),
])
def test_a_full_disk_is_one_line(full: tuple[Path, Path, Path], tmp_path: Path, name: str, argv: list[str],
                                 changed: dict[str, object], fragments: tuple[str, ...]) -> None:
    small, state, archive = full
    where = small / str(changed.pop("state_dir")) if "state_dir" in changed else state
    cfg = write_config(tmp_path, {"echo": ECHO | changed}, state_dir=str(where), **TRUST)
    meta = (state / "checkpoints" / "echo" / "meta.json").read_bytes()
    kept = sorted(p.name for p in (state / "checkpoints").iterdir())
    proc = run_cli(*(a.format(cfg=cfg, archive=archive) for a in argv), timeout=120)
    assert_one_line_error(proc, *fragments, str(where))
    assert proc.returncode in (1, 2), (name, proc.returncode)  # an operator's error, not a bug (70)
    for d in {state, where}:
        res = host_resources(d)
        assert res["runc"] == [] and res["mounts"] == [] and res["dirs"] == [] and res["procs"] == [], (name, res)
    assert (state / "checkpoints" / "echo" / "meta.json").read_bytes() == meta  # the old checkpoint is intact
    assert sorted(p.name for p in (state / "checkpoints").iterdir()) == kept  # nothing half-made left behind
