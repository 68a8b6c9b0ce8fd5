"""Checkpoint archives as the tests handle them: signing keys made by the CLI, and archives rewritten by hand (an
attacker's, or another kind of host's) with every digest made correct again."""

from __future__ import annotations

import json
import subprocess
import tarfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from activator.checkpoints import ociarchive, ocilayer
from tests.daemonproc import ACTIVATOR


def make_key(where: Path, name: str) -> Path:
    """A signing key pair made by the CLI, as an operator makes one: where/name (0600) and where/name.pub."""
    where.mkdir(mode=0o700, exist_ok=True)
    r = subprocess.run([*ACTIVATOR, "checkpoint", "keygen", str(where / name), "-c", str(where / "none.yaml")],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return where / name


def rewrite(src: Path, dst: Path, tmp: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    """A copy of a checkpoint image whose activator.json `edit` changed, written again with correct digests and
    no signature (what an attacker, or a host with another kernel or CPU, would have made)."""
    image = ociarchive.read(src)
    work = tmp / f"rewrite-{time.monotonic_ns()}"
    (work / "layer").mkdir(parents=True)
    ocilayer.unpack_layer(image, work / "layer", max_bytes=2**30)
    meta = json.loads((work / "layer" / "activator.json").read_text())
    edit(meta)
    (work / "layer" / "activator.json").write_text(json.dumps(meta))
    with tarfile.open(work / "layer.tar", "w") as t:
        for p in sorted((work / "layer").iterdir()):
            t.add(p, p.name)
    ociarchive.write(dst, work / "layer.tar", image.annotations, ref=image.ref, arch="amd64",
                     created=image.config["created"])
