"""A Compose service's volumes: host paths, named volumes (activator's own, or Docker's when external) and tmpfs
entries."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .composecontext import Context, is_set


def volumes(raw: Any, ctx: Context) -> tuple[list[Any], list[str]]:
    """Compose volumes -> activator's, and tmpfs entries: relative and ~ host paths resolved against the Compose
    file's directory; a named volume is the top-level volume's Docker volume when that is `external: true`, else
    activator's own (state_dir/volumes/NAME: docker compose's volume of that name is not shared)."""
    if not isinstance(raw, list):
        raise ctx.error("volumes", "expected a list")
    out: list[Any] = []
    tmpfs: list[str] = []
    for v in raw:
        if isinstance(v, Mapping):
            kind = v.get("type", "volume")
            if kind == "tmpfs":
                size = (v.get("tmpfs") or {}).get("size")
                mode = (v.get("tmpfs") or {}).get("mode")
                opts = [*([f"size={size}"] if size is not None else []), *([f"mode={mode:o}" if isinstance(mode, int)
                                                                            else f"mode={mode}"] if mode else [])]
                tmpfs.append(f"{v.get('target')}{':' + ','.join(opts) if opts else ''}")
                continue
            if kind not in ("volume", "bind"):
                raise ctx.error("volumes", f"type {kind} is not supported (bind, volume or tmpfs)")
            source, target, ro = v.get("source"), v.get("target"), bool(v.get("read_only", False))
            owners: dict[str, bool] = {}
            if not isinstance(source, str) or not isinstance(target, str):
                raise ctx.error("volumes", "a volume needs source and target (anonymous volumes would be lost with "
                                           "their instance)")
        else:
            parts = str(v).split(":")
            if len(parts) < 2:
                raise ctx.error("volumes", f"'{v}' has no source: an anonymous volume would be lost with its "
                                           f"instance; name it (NAME:{v})")
            source, target = parts[0], parts[1]
            opts = parts[2].split(",") if len(parts) > 2 else []
            ro = "ro" in opts
            # Podman's owner options (Compose files written for podman-compose carry them): activator's own
            owners = {k: True for o, k in (("U", "chown"), ("idmap", "idmap")) if o in opts}
        if source.startswith((".", "~", "/")):
            if source.startswith("."):
                source = str((ctx.base / source).resolve())
            elif source.startswith("~"):
                source = str(Path(source).expanduser())
            out.append({"source": source, "target": target, "read_only": ro} | owners)
            continue
        decl = ctx.top_volumes.get(source, {}) or {}
        if source not in ctx.top_volumes:
            raise ctx.error("volumes", f"'{source}' is not declared under the top-level volumes: (Compose "
                                       f"requires it); add `volumes: {{{source}: {{}}}}`")
        if not isinstance(decl, Mapping):
            raise ctx.error("volumes", f"volumes.{source}: expected a mapping")
        if decl.get("external"):
            out.append({"source": str(decl.get("name") or source), "target": target, "read_only": ro,
                        "external": True})
            continue
        if (is_set(decl.get("driver")) and decl.get("driver") != "local") or is_set(decl.get("driver_opts")):
            raise ctx.error("volumes", f"'{source}': a volume with a driver or driver_opts is not supported; "
                                       "create it with docker volume create and mark it external: true")
        ctx.note(f"volumes.{source}", f"kept by activator in state_dir/volumes/{source}, not shared with docker "
                                      "compose's volume of that name (mark it external: true to use Docker's)")
        out.append({"source": source, "target": target, "read_only": ro})
    return out, tmpfs
