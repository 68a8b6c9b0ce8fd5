"""What an app wrote, kept after its instance is gone: state_dir/logs/SERVICE.output (root only), rotated.

Each instance writes its stdout and stderr to output.log in its own directory (a file, handed over by runc and
CRIU on restore). When the instance is released its output is appended here under a line naming it, and the
file is rotated past MAX_BYTES (one older generation kept, SERVICE.output.1), so an app's output outlives its
instance without filling the disk. `activator logs SERVICE [-f]` reads these and the live instances' files.

Whose output it is comes from what the instance's own directory records (OWNER, written when it is made), not
from its name: a template is named SERVICE-tpl-XXXXXXXX and an instance SERVICE-XXXXXXXX, so service `a`'s
template and service `a-tpl`'s instances have names of the same shape. Only a name without a record (a template,
whose output is kept from the build's directory, or an instance left by an older run) is read as a name. The
kept file's name is the service's name and a suffix that starts with `.`, which no service name holds
(config/service.py), so no service's files can be taken for another's.
"""

from __future__ import annotations

import os
import re
import time
from pathlib import Path

from activator.config.service import NAME_PATTERN
from activator.statedir import open_private, write_private

MAX_BYTES = 8 << 20
SUFFIX = ".output"
#: in an instance's directory: the name of the service it is an instance of
OWNER = "service"
_INSTANCE = re.compile(r"(?P<service>.+?)(?:-tpl)?-[0-9a-f]{8}")
_NAME = re.compile(NAME_PATTERN)


def service_of(instance: str) -> str | None:
    """By the name alone, for what has no record (a template): web-1a2b3c4d -> web; web-tpl-1a2b3c4d (a
    template) -> web. Ambiguous for instances of a service whose name ends in -tpl: owner() first."""
    m = _INSTANCE.fullmatch(instance)
    return m.group("service") if m else None


def record_owner(instance_dir: Path, service: str) -> None:
    """Blocking. Say, in the instance's own directory, whose instance it is (owner(), keep())."""
    write_private(instance_dir / OWNER, service)


def owner(instance_dir: Path) -> str | None:
    """The service an instance directory belongs to: its record, else its name read as a template's."""
    try:
        recorded = (instance_dir / OWNER).read_text().strip()
    except OSError:
        return service_of(instance_dir.name)
    return recorded if _NAME.fullmatch(recorded) else None


def kept(logs: Path, service: str) -> list[Path]:
    """The kept files of a service, oldest first."""
    current = logs / f"{service}{SUFFIX}"
    return [p for p in (current.with_name(current.name + ".1"), current) if p.is_file()]


def keep(output: Path, logs: Path, instance: str) -> None:
    """Blocking. Append an instance's output to its service's kept file (the last MAX_BYTES of it at most). The
    service is the one recorded beside the output (owner()), else the one the name says (a template's output,
    kept from the build's directory, which has no record)."""
    service = owner(output.parent) if (output.parent / OWNER).exists() else service_of(instance)
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
