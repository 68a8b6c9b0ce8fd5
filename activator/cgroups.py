"""An instance's cgroups (/activator/NAME in every hierarchy, v1 or v2), removed even when runc cannot.

`runc delete` removes them when runc knows the container. When it does not (runc was killed during a restore
that ran past restore_timeout, or a crash came between runc creating the cgroups and recording the container),
they are left behind, possibly with a half-restored process inside. remove() kills what is in them and
removes the directories.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup")
PARENT = "activator"


def paths(name: str) -> list[Path]:
    """Every existing cgroup directory of this instance (v1: one per hierarchy; v2: one)."""
    found = [p for p in ROOT.glob(f"*/{PARENT}/{name}") if p.is_dir()]
    unified = ROOT / PARENT / name
    return found + ([unified] if unified.is_dir() else [])


def remove(name: str, timeout: float = 2.0) -> list[Path]:
    """Kill every process in the instance's cgroups and remove them; returns what could not be removed."""
    left = paths(name)
    deadline = time.monotonic() + timeout
    while left:
        for cg in left:
            with contextlib.suppress(OSError):
                for pid in (cg / "cgroup.procs").read_text().split():
                    with contextlib.suppress(ProcessLookupError, ValueError):
                        os.kill(int(pid), signal.SIGKILL)
            with contextlib.suppress(OSError):
                cg.rmdir()
        left = [cg for cg in left if cg.is_dir()]
        if not left or time.monotonic() > deadline:
            break
        time.sleep(0.01)  # killed processes take a moment to leave the cgroup
    return left
