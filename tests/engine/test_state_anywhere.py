"""A state_dir under a directory other users cannot pass (`mktemp -d`, /root/...) works: instances in their user
namespace reach it through a private bind under /run (statedir.ALIASES), gone at stop, and nothing under it is
readable by other users through either path."""

from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

import pytest

from activator.statedir import ALIASES, StateDir, _aliases
from tests.conftest import HTTPD, host_resources, http_get, write_config

from .test_cli import run_cli
from .test_state_permissions import SECRET, everything_under, readable_by_nobody

pytestmark = [pytest.mark.engine]


def mounted_under(*roots: Path) -> list[str]:
    with open("/proc/self/mountinfo") as f:
        points = [line.split()[4] for line in f]
    return [p for p in points if any(p == str(r) or p.startswith(f"{r}/") for r in roots)]


@pytest.fixture
def private(tmp_path: Path) -> Path:
    d = tmp_path / "private"
    d.mkdir(mode=0o700)
    d.chmod(0o700)  # what `mktemp -d` and /root give: other users cannot pass
    return d


@pytest.mark.asyncio
async def test_a_state_dir_others_cannot_reach_serves(start, private: Path) -> None:  # type: ignore[no-untyped-def]
    state = private / "state"
    run = await start({"web": HTTPD | {"environment": [SECRET], "volumes": ["webdata:/data"]}}, state_dir=str(state))
    assert b"200 OK" in await http_get(run.port("web"))
    (inst,) = run.act.services["web"].instances
    assert inst.how == "restore"
    alias = run.act.fleet.state.alias
    assert alias is not None and alias.parent == ALIASES and os.path.samefile(alias, state)
    assert str(inst.sandbox.layout.dir).startswith(f"{alias}/instances/")  # what runc and CRIU were given
    assert mounted_under(alias) and not mounted_under(state)  # private: the instances' mounts stay in the bind
    paths = everything_under(state) + everything_under(alias)
    assert any(p.endswith("bundle/config.json") for p in paths)
    assert readable_by_nobody(paths) == []
    await run.act.shutdown()
    assert mounted_under(alias, state) == [] and not alias.exists()
    assert host_resources(state)["dirs"] == []
    assert (private.stat().st_mode & 0o777) == 0o700  # the operator's directory is left as it was


def test_validate_and_checkpoint_take_it(tmp_path: Path, private: Path) -> None:
    """The one-shot commands too; `validate` no longer refuses what `run` now serves."""
    cfg = write_config(tmp_path, {"web": HTTPD}, state_dir=str(private / "state"))
    ok = run_cli("validate", str(cfg))
    assert ok.returncode == 0, ok.stderr
    built = run_cli("checkpoint", "web", "-c", str(cfg), timeout=300)
    assert built.returncode == 0, built.stderr
    assert mounted_under(ALIASES, private) == []


def test_cleanup_unmounts_a_killed_runs_bind_once_state_dir_is_passable(tmp_path: Path, private: Path) -> None:
    """A run is killed while its state_dir is bound under /run (an instance's mount inside the bind); the operator
    then does what the refusal advises (`chmod o+x` the parent), so no bind is needed any more, and runs
    `activator cleanup`. Nothing else would ever unmount the killed run's bind or what is mounted inside it."""
    state = private / "state"
    killed = StateDir(state)
    killed.lock()
    alias = killed.alias
    assert alias is not None
    inside = alias / "instances" / "killed"
    inside.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "killed", str(inside)], check=True)
    assert killed._lock_fd is not None
    os.close(killed._lock_fd)  # killed: the lock goes with the process, the mounts stay
    _aliases.pop(alias, None)
    try:
        cfg = write_config(tmp_path, {"web": HTTPD}, state_dir=str(state))
        private.chmod(0o711)
        out = run_cli("cleanup", "-c", str(cfg))
        assert out.returncode == 0, out.stderr
        assert mounted_under(alias) == [] and not alias.exists()
        assert mounted_under(state) == []
        # the positive control: the state_dir itself is as it was, and run serves from it (validate says so)
        assert (state / "lock").exists() and (state / "instances").is_dir()
        ok = run_cli("validate", str(cfg))
        assert ok.returncode == 0, ok.stderr
    finally:
        for p in (inside, alias):
            subprocess.run(["umount", "-l", str(p)], capture_output=True)
        with contextlib.suppress(OSError):
            alias.rmdir()
