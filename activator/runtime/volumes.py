"""Volumes: host directories bound into the template and every instance, so data outlives instances.

A host path is bound as it is (made, empty, if missing, as `docker run -v` does). A named volume is
state_dir/volumes/NAME; the first time it is made, it is filled with what the image has at the target (files,
modes and owners), as Docker fills a new named volume, so an app that expects its directory's initial contents
(or a non-root app that expects to own it) finds them. The volumes directory itself is root only, like the rest
of state_dir; the container reaches a volume through its bind mount, not through that path.

CRIU sees a volume as an external bind mount: runc marks it so in the dump (keyed by its target) and the restore
maps the key back to the host directory. Files the app holds open in a volume at dump time must still be there,
with the same size, when an instance is restored, or the restore fails and the instance is cold-started.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from activator.config.mounts import Volume
from activator.errors import ActivatorError

from . import imagefs, volumeowner
from .userns import IdMap, shift_tree

log = logging.getLogger("activator.volumes")


@dataclass(frozen=True)
class Bind:
    host: Path
    target: str
    read_only: bool
    # In a user namespace, seen through the range (host uid N as N): a Docker volume, whose files are owned the
    # way Docker's containers (without userns-remap) see them. Host paths are not: their owners are the host's.
    idmapped: bool = False


#: a named volume is one directory of state_dir/volumes: a name that is a path (`..`, a slash) would be another
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


def named(state_root: Path, name: str) -> Path:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise ActivatorError(f"volumes: {name!r} is not a volume name (letters, digits, _ . -; no slash or `..`)")
    return state_root / "volumes" / name


def binds(volumes: tuple[Volume, ...], state_root: Path) -> tuple[Bind, ...]:
    return tuple(Bind(docker_volume(v.source) if v.external else
                      named(state_root, v.source) if v.named else Path(v.source), v.target, v.read_only,
                      v.external or v.idmap)
                 for v in volumes)


def docker_volume(name: str) -> Path:
    """Blocking. Where Docker keeps an existing local volume's data (Compose's `external: true`), asked of dockerd
    each time (a removed and re-created volume moves)."""
    import docker  # the image source's SDK: only services with such a volume need dockerd here

    try:
        attrs = docker.from_env(timeout=10).volumes.get(name).attrs
    except docker.errors.NotFound:
        raise ActivatorError(f"volumes: Docker volume '{name}' does not exist (external: true uses an existing "
                             f"one); create it with `docker volume create {name}`") from None
    except docker.errors.DockerException as e:
        raise ActivatorError(f"volumes: cannot ask Docker for volume '{name}': {e}") from None
    if attrs.get("Driver") != "local" or (attrs.get("Options") or {}).get("type") not in (None, "", "none"):
        raise ActivatorError(f"volumes: Docker volume '{name}' uses driver {attrs.get('Driver')} with options "
                             f"{attrs.get('Options')}: only local volumes on the host's disk can be bound")
    path = Path(attrs["Mountpoint"])
    if not path.is_dir():
        raise ActivatorError(f"volumes: Docker volume '{name}' has no data directory at {path}")
    return path


def ensure(volumes: tuple[Volume, ...], state_root: Path, image_root: Path, service: str,
           idmap: IdMap | None = None, user: tuple[int, int] = (0, 0)) -> tuple[Bind, ...]:
    """Blocking. Make what does not exist yet; the binds to mount. With a user namespace, activator's own named
    volumes are owned by the service's range (one made without it is shifted to it once); host paths and Docker's
    volumes are bound as they are, but for `U` (given to user, the app's uid and gid inside: volumeowner.py) and
    `idmap` (checked here, mounted by the sandbox)."""
    for v in volumes:  # refused before anything is made on the host
        if v.chown or v.idmap:
            volumeowner.check(Path(v.source), state_root, "U" if v.chown else "idmap", service)
        if v.idmap:
            if idmap is None:
                raise ActivatorError(f"service '{service}': volumes: idmap on {v.source} needs the service's user "
                                     "namespace (userns: private, the default); with userns: host use U")
            if Path(v.source).is_dir() and (why := volumeowner.idmap_unsupported(Path(v.source), idmap)):
                raise ActivatorError(f"service '{service}': volumes: idmap on {v.source}: {why}; use U instead")
    try:
        out = binds(volumes, state_root)
    except ActivatorError as e:
        raise ActivatorError(f"service '{service}': {e}") from None
    for v, b in zip(volumes, out, strict=True):
        if b.host.is_dir():
            if idmap is not None and v.named and not v.external and os.stat(b.host).st_uid < idmap.size:
                n = shift_tree(b.host, idmap)
                log.info("service=%s volume '%s': %d files given to the user namespace range %s", service,
                         v.source, n, idmap)
            continue
        if b.host.exists():
            raise ActivatorError(f"service '{service}': volumes: {b.host} exists and is not a directory; "
                                 "remove it or bind another path")
        if v.external:
            raise ActivatorError(f"service '{service}': volumes: Docker volume '{v.source}' has no directory at "
                                 f"{b.host}")
        if not v.named:
            b.host.mkdir(mode=0o755, parents=True)
            log.info("service=%s volume %s made (empty) for %s", service, b.host, v.target)
            if v.idmap and idmap is not None and (why := volumeowner.idmap_unsupported(b.host, idmap)):
                raise ActivatorError(f"service '{service}': volumes: idmap on {v.source}: {why}; use U instead")
            continue
        b.host.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = b.host.with_name(f".new-{b.host.name}")
        shutil.rmtree(tmp, ignore_errors=True)
        # The target as the container sees it: the image's symlinks resolved inside the image (imagefs), never
        # to the host's directories.
        seed = imagefs.open_dir(image_root, v.target)
        if seed is not None:
            try:
                # cp -a: owners, modes, links and special files exactly as the image has them (cp copies
                # symlinks inside the tree as symlinks; it follows none)
                done = subprocess.run(["cp", "-a", "--", f"/proc/self/fd/{seed}/.", str(tmp)], capture_output=True,
                                      text=True, pass_fds=(seed,))
            finally:
                os.close(seed)
            if done.returncode != 0:
                shutil.rmtree(tmp, ignore_errors=True)
                raise ActivatorError(f"service '{service}': filling volume '{v.source}' from the image's "
                                     f"{v.target} failed: {done.stderr.strip()[:200]}")
        else:
            tmp.mkdir(mode=0o755)
        if idmap is not None:
            shift_tree(tmp, idmap)
        os.rename(tmp, b.host)  # a crash mid-copy leaves a .new- directory, never a half-filled volume
        log.info("service=%s volume '%s' made for %s%s", service, v.source, v.target,
                 " (filled from the image)" if seed is not None else "")
    for v in volumes:
        if v.chown:
            volumeowner.give(Path(v.source), state_root, service, user, idmap)
    return out
