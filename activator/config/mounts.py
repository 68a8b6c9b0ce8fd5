"""What is mounted into an instance besides its image: volumes (host paths, named and external ones) and
tmpfs mounts, with the kinds that parse them.

Pure: paths are normalised as text, nothing on the host is looked at.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .kinds import Kind
from .units import parse_size
from .units import show as _show


@dataclass(frozen=True)
class Volume:
    """source: an absolute host path (bound as is), a volume name (state_dir/volumes/NAME), or with external a
    Docker volume's name (its data used as it is, as Compose's `external: true`)."""

    source: str
    target: str
    read_only: bool = False
    external: bool = False
    #: Podman's `U`: the host directory given (chowned, recursively) to the user the app runs as
    chown: bool = False
    #: Podman's `idmap`: bound through an idmapped mount, so host owners are kept and the app sees them as its own
    idmap: bool = False

    @property
    def named(self) -> bool:
        return not self.source.startswith("/") and not self.external

    def plain(self) -> dict[str, Any]:
        """For the checkpoint fingerprint: the options added later only when set, so a volume written before
        they existed keeps its fingerprint (and its checkpoint)."""
        out = asdict(self)
        for name in ("chown", "idmap"):
            if not out[name]:
                del out[name]
        return out


_VOLUME_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
#: the short form's options, as Docker and Podman write them (`/srv/data:/data:ro,U`)
VOLUME_OPTIONS = ("ro", "rw", "U", "idmap")
_VOLUME_KEYS = ("source", "target", "read_only", "external", "chown", "idmap")
#: where a volume may not go: what the container's own mounts are made of
_NOT_A_TARGET = ("/proc", "/sys", "/dev")


@dataclass(frozen=True)
class Volumes(Kind):
    """`SOURCE:TARGET[:ro|rw]` strings (as docker run -v and Compose), or {source, target, read_only}."""

    def parse(self, raw: Any) -> tuple[Volume, ...]:
        if not isinstance(raw, list):
            raise ValueError(f"expected a list of SOURCE:TARGET[:ro], got {_show(raw)}")
        out: list[Volume] = []
        for item in raw:
            if isinstance(item, str):
                parts = item.split(":")
                opts = parts[2].split(",") if len(parts) == 3 else []
                if len(parts) not in (2, 3) or any(o not in VOLUME_OPTIONS for o in opts) \
                        or len(set(opts)) != len(opts) or {"ro", "rw"} <= set(opts):
                    raise ValueError(f"'{item[:80]}' is not SOURCE:TARGET[:OPTIONS] (OPTIONS: comma-separated, one "
                                     "of ro or rw, and U or idmap for a host path)")
                v = Volume(parts[0], parts[1], "ro" in opts, chown="U" in opts, idmap="idmap" in opts)
            elif isinstance(item, Mapping) and set(item) <= set(_VOLUME_KEYS):
                if not isinstance(item.get("source"), str) or not isinstance(item.get("target"), str) \
                        or not all(isinstance(item.get(k, False), bool) for k in _VOLUME_KEYS[2:]):
                    raise ValueError("a volume needs source and target strings (and read_only, external, chown, "
                                     "idmap: true/false)")
                v = Volume(item["source"], item["target"], item.get("read_only", False), item.get("external", False),
                           item.get("chown", False), item.get("idmap", False))
            else:
                raise ValueError(f"expected SOURCE:TARGET[:ro] or {{source, target, read_only}}, got {_show(item)}")
            if (v.chown or v.idmap) and not v.source.startswith("/"):
                raise ValueError(f"'{v.source[:80]}': U (chown) and idmap apply to host paths only (a named volume "
                                 "is already owned by the service's user namespace range)")
            if v.chown and v.idmap:
                raise ValueError(f"'{v.source[:80]}': U (chown) and idmap together: pick one (idmap keeps the "
                                 "host's owners, U changes them)")
            target = os.path.normpath(v.target)
            if not v.target.startswith("/") or target == "/" or any(
                    target == p or target.startswith(p + "/") for p in _NOT_A_TARGET):
                raise ValueError(f"'{v.target[:80]}': the target must be an absolute path other than /, /proc, "
                                 "/sys and /dev")
            if v.named and not _VOLUME_NAME.fullmatch(v.source):
                raise ValueError(f"'{v.source[:80]}' is neither an absolute host path nor a volume name "
                                 "(letters, digits, '_', '.', '-')")
            if v.external and not _VOLUME_NAME.fullmatch(v.source):
                raise ValueError(f"'{v.source[:80]}' is not a Docker volume name (external: true)")
            if not v.named and ("\0" in v.source or os.path.normpath(v.source) == "/"):
                raise ValueError(f"'{v.source[:80]}': not a host path to bind")
            if any(o.target == target for o in out):
                raise ValueError(f"two volumes on {target}")
            out.append(Volume(v.source if v.named or v.external else os.path.normpath(v.source), target,
                              v.read_only, v.external, v.chown, v.idmap))
        return tuple(out)

    def describe(self) -> tuple[str, str]:
        return "list of SOURCE:TARGET[:OPTIONS], or {source, target, read_only, external, chown, idmap}", (
            "SOURCE: an absolute host path or a volume name; TARGET: absolute, not /, /proc, /sys or /dev; OPTIONS: "
            "ro or rw, and U or idmap (host paths; not /, state_dir or the system's directories)")

    def schema(self) -> dict[str, Any]:
        return {"type": "array", "items": {"oneOf": [
            {"type": "string", "pattern": r"^[^:]+:/[^:]*(:(ro|rw|U|idmap)(,(ro|rw|U|idmap))*)?$"},
            {"type": "object", "required": ["source", "target"], "additionalProperties": False,
             "properties": {"source": {"type": "string"}, "target": {"type": "string"},
                            "read_only": {"type": "boolean"}, "external": {"type": "boolean"},
                            "chown": {"type": "boolean"}, "idmap": {"type": "boolean"}}}]}}


@dataclass(frozen=True)
class TmpfsMount:
    target: str
    options: tuple[str, ...]  # mount options, Docker's defaults (rw,noexec,nosuid,nodev) included


#: what `docker run --tmpfs` and Compose accept after the path, besides size= and mode=
_TMPFS_FLAGS = frozenset({"ro", "rw", "exec", "noexec", "suid", "nosuid", "dev", "nodev", "atime", "noatime",
                          "relatime", "strictatime", "nodiratime"})


@dataclass(frozen=True)
class Tmpfs(Kind):
    """`PATH[:OPTIONS]` (as docker run --tmpfs and Compose): an empty tmpfs on PATH, rw,noexec,nosuid,nodev unless
    the options say otherwise; size=N[k|m|g], mode=OCTAL, uid=N, gid=N."""

    def parse(self, raw: Any) -> tuple[TmpfsMount, ...]:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
            raise ValueError(f"expected a list of PATH[:OPTIONS], got {_show(raw)}")
        out: list[TmpfsMount] = []
        for item in items:
            target, _, opts = item.partition(":")
            target = os.path.normpath(target) if target.startswith("/") else target
            if not target.startswith("/") or target == "/" or any(
                    target == p or target.startswith(p + "/") for p in _NOT_A_TARGET):
                raise ValueError(f"'{item[:80]}': the path must be absolute, other than /, /proc, /sys and /dev")
            options = ["rw", "noexec", "nosuid", "nodev"]
            for o in filter(None, opts.split(",")):
                name, eq, value = o.partition("=")
                if (not eq and name not in _TMPFS_FLAGS) or (eq and name not in ("size", "mode", "uid", "gid")):
                    raise ValueError(f"'{item[:80]}': unknown tmpfs option '{o[:40]}' (size=, mode=, uid=, gid=, "
                                     "ro, exec, suid, dev, ...)")
                if name == "size":
                    value = str(parse_size(value.lower().removesuffix("b") if value[-1:] in "bB" else value))
                elif name == "mode" and not re.fullmatch(r"[0-7]{3,4}", value):
                    raise ValueError(f"'{item[:80]}': mode must be octal, like 1777")
                elif name in ("uid", "gid") and not value.isdigit():
                    raise ValueError(f"'{item[:80]}': {name} must be a number")
                opposite = {"ro": "rw", "rw": "ro", "exec": "noexec", "noexec": "exec", "suid": "nosuid",
                            "nosuid": "suid", "dev": "nodev", "nodev": "dev"}.get(name)
                options = [x for x in options if x != opposite and x.partition("=")[0] != name]
                options.append(f"{name}={value}" if eq else name)
            if any(t.target == target for t in out):
                raise ValueError(f"two tmpfs mounts on {target}")
            out.append(TmpfsMount(target, tuple(options)))
        return tuple(out)

    def describe(self) -> tuple[str, str]:
        return "PATH[:OPTIONS], or a list of them", "absolute paths other than /, /proc, /sys and /dev"

    def schema(self) -> dict[str, Any]:
        one = {"type": "string", "pattern": "^/"}
        return {"oneOf": [one, {"type": "array", "items": one}]}
