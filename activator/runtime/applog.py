"""What an app wrote, kept after its instance is gone: state_dir/logs/SERVICE.output (root only), rotated.

Each instance writes its stdout and stderr to output.log in its own directory (a file, handed over by runc and
CRIU on restore). When the instance is released its output is appended here under a line naming it, and the
file is rotated past MAX_BYTES (one older generation kept, SERVICE.output.1), so an app's output outlives its
instance without filling the disk. `activator logs SERVICE [-f]` reads these and the live instances' files.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from activator.statedir import open_private

MAX_BYTES = 8 << 20
SUFFIX = ".output"
_INSTANCE = re.compile(r"(?P<service>.+?)(?:-tpl)?-[0-9a-f]{8}")


def service_of(instance: str) -> str | None:
    """web-1a2b3c4d -> web; web-tpl-1a2b3c4d (a template) -> web."""
    m = _INSTANCE.fullmatch(instance)
    return m.group("service") if m else None


def kept(logs: Path, service: str) -> list[Path]:
    """The kept files of a service, oldest first."""
    current = logs / f"{service}{SUFFIX}"
    return [p for p in (current.with_name(current.name + ".1"), current) if p.is_file()]


def keep(output: Path, logs: Path, instance: str) -> None:
    """Blocking. Append an instance's output to its service's kept file (the last MAX_BYTES of it at most)."""
    service = service_of(instance)
    try:
        size = output.stat().st_size
    except OSError:
        return
    if service is None or size == 0:
        return
    logs.mkdir(mode=0o700, parents=True, exist_ok=True)
    dest = logs / f"{service}{SUFFIX}"
    take = min(size, MAX_BYTES)
    try:
        if dest.stat().st_size + take > MAX_BYTES:
            os.replace(dest, dest.with_name(dest.name + ".1"))
    except FileNotFoundError:
        pass
    header = f"--- {instance}: its output until {time.strftime('%Y-%m-%d %H:%M:%S')} ---\n".encode()
    fd = open_private(dest)
    try:
        os.write(fd, header)
        with open(output, "rb") as src:
            src.seek(size - take)
            while chunk := src.read(1 << 16):
                os.write(fd, chunk)
    finally:
        os.close(fd)
