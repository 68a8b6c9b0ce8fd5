"""Nothing under state_dir that can hold app data, environment or memory is readable by other users.

Checked the way an attacker would: as an unprivileged user (setpriv to nobody), trying to list every directory
and read every file the daemon made, with a running instance, a checkpoint and a failure's logs in place.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import ECHO, HTTPD, echo, http_get

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

SECRET = "DB_PASSWORD=hunter2-do-not-leak"

# Runs as nobody: for each path, can it be listed (dirs) or read (files)?
PROBE = r"""
import json, os, sys
readable = []
for p in json.load(sys.stdin):
    try:
        if os.path.isdir(p) and not os.path.islink(p):
            os.listdir(p)
        elif os.path.isfile(p) and not os.path.islink(p):
            with open(p, "rb") as f:
                f.read(1)
        else:
            continue
        readable.append(p)
    except OSError:
        pass
print(json.dumps(readable))
"""


def readable_by_nobody(paths: list[str]) -> list[str]:
    out = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-c", PROBE],
                         input=json.dumps(paths), capture_output=True, text=True, timeout=60, cwd="/")
    assert out.returncode == 0, out.stderr
    result: list[str] = json.loads(out.stdout)
    return result


def everything_under(root: Path) -> list[str]:
    """Every path under root, not crossing into mounts (an instance's root filesystem, its image, its sysfs):
    their mount points are checked, what they show is not state_dir's."""
    paths = [str(root)]
    for d, dirs, files in os.walk(root):
        paths += [os.path.join(d, n) for n in dirs + files]
        dirs[:] = [n for n in dirs if not os.path.ismount(os.path.join(d, n))]
    return paths


@pytest.fixture
def public_parent() -> Iterator[Path]:
    """A parent directory any user may traverse (pytest's own tmp dir is private, which would hide the bug)."""
    d = Path(tempfile.mkdtemp(prefix="activator-perm-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


async def test_other_users_can_read_nothing_under_state_dir(start, public_parent: Path) -> None:  # type: ignore[no-untyped-def]
    state = public_parent / "state"
    state.mkdir(mode=0o755)  # made loose beforehand: the daemon must tighten it
    env = {"environment": [SECRET]}
    run = await start({"web": HTTPD | env, "echo": ECHO | env}, state_dir=str(state))
    assert b"200 OK" in await http_get(run.port("web"))  # a running instance: bundle, upper dir, logs
    broken = run.act.services["echo"].checkpoint
    assert broken is not None
    for core in broken.images.glob("core-*.img"):
        core.unlink()  # its restore fails: CRIU's and the app's logs are kept under logs/
    assert await echo(run.port("echo"), b"x") == b"x"
    assert list((state / "logs").iterdir())
    assert (state.stat().st_mode & 0o777) == 0o711  # passable (instances reach their own dirs), not listable

    paths = everything_under(state)
    holding_secret = [p for p in paths if os.path.isfile(p) and SECRET.encode() in Path(p).read_bytes()]
    assert any(p.endswith("bundle/config.json") for p in holding_secret)  # the secret really is in there
    assert any("/checkpoints/" in p for p in holding_secret)  # ... and in the dump's files
    assert readable_by_nobody(paths) == []

    # Even if an operator loosens state_dir itself, what is inside stays private.
    state.chmod(0o755)
    try:
        assert readable_by_nobody(paths) == [str(state)]  # the top-level names, nothing more
    finally:
        state.chmod(0o700)
    # Group-readable only by the service's own user namespace range (the dump, which its restore reads).
    ranges = set(json.loads((state / "userns.json").read_text()).values())
    for p in holding_secret:
        st = os.stat(p)
        assert st.st_mode & 0o007 == 0 and (st.st_mode & 0o070 == 0 or st.st_gid in ranges), p
