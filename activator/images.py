"""The Docker engine as an image source.

Docker resolves a reference to an image ID and hands over the image config and a flat root filesystem; nothing
runs under Docker. Root filesystems are unpacked once per image ID into the state directory and then shared,
read-only, as the lowest overlay layer of the template and of every instance.

Blocking calls (the SDK is synchronous): callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .errors import ImageError, PreflightError


@dataclass(frozen=True)
class ImageInfo:
    id: str  # sha256:...
    ref: str
    env: tuple[str, ...]
    cmd: tuple[str, ...]
    entrypoint: tuple[str, ...]
    working_dir: str
    user: str

    @property
    def short_id(self) -> str:
        return self.id.split(":", 1)[-1][:16]


def _client() -> Any:
    import docker  # imported here: `activator validate` must work without a Docker engine

    try:
        client = docker.from_env(timeout=120)
        client.ping()
    except Exception as e:
        raise PreflightError(
            f"cannot reach the Docker engine ({type(e).__name__}); start dockerd (make setup does) "
            "or set DOCKER_HOST"
        ) from None
    return client


class DockerImageSource:
    def __init__(self) -> None:
        self._docker: Any = None

    @property
    def docker(self) -> Any:
        if self._docker is None:
            self._docker = _client()
        return self._docker

    def resolve(self, ref: str, service: str) -> ImageInfo:
        import docker.errors

        try:
            image = self.docker.images.get(ref)
        except docker.errors.ImageNotFound:
            raise ImageError(
                f"service '{service}': image '{ref}' is not in the local Docker engine; "
                f"build or pull it (docker pull {ref}, or make images for the demo images)"
            ) from None
        except docker.errors.APIError as e:
            raise ImageError(f"service '{service}': cannot read image '{ref}': {e.explanation}") from None
        cfg = image.attrs.get("Config") or {}
        return ImageInfo(
            id=image.id,
            ref=ref,
            env=tuple(cfg.get("Env") or ()),
            cmd=tuple(cfg.get("Cmd") or ()),
            entrypoint=tuple(cfg.get("Entrypoint") or ()),
            working_dir=cfg.get("WorkingDir") or "/",
            user=cfg.get("User") or "",
        )

    def export_rootfs(self, image: ImageInfo, dest: Path) -> None:
        """Unpack the image's filesystem into dest (created atomically: a crash leaves no half tree)."""
        if dest.is_dir():
            return
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
        container = self.docker.containers.create(image.id, command=["/"], entrypoint=[""])
        try:
            with subprocess.Popen(
                ["tar", "-x", "--numeric-owner", "-C", str(tmp)],
                stdin=subprocess.PIPE, stderr=subprocess.PIPE,
            ) as tar:
                assert tar.stdin is not None
                for chunk in container.export():
                    tar.stdin.write(chunk)
                tar.stdin.close()
                err = tar.stderr.read().decode(errors="replace") if tar.stderr else ""
                if tar.wait() != 0:
                    raise ImageError(f"unpacking image '{image.ref}' failed: {err.strip()[:200]}")
            try:
                os.rename(tmp, dest)
            except OSError:
                if not dest.is_dir():
                    raise
                shutil.rmtree(tmp, ignore_errors=True)  # another build unpacked the same image first: use that
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True)


def _lookup(path: Path, name: str) -> list[str] | None:
    with contextlib.suppress(OSError):
        for line in path.read_text(errors="replace").splitlines():
            fields = line.split(":")
            if fields and fields[0] == name:
                return fields
    return None


def resolve_user(rootfs: Path, user: str, service: str) -> tuple[int, int, tuple[int, ...]]:
    """Docker's USER forms (name, uid, name:group, uid:gid) to numbers, via the image's passwd and group."""
    if not user:
        return 0, 0, ()
    name, _, group = user.partition(":")
    if name.isdigit():
        uid = int(name)
        pw = None
    else:
        pw = _lookup(rootfs / "etc/passwd", name)
        if pw is None or len(pw) < 4:
            raise ImageError(f"service '{service}': user '{name}' is not in the image's /etc/passwd")
        uid = int(pw[2])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            gr = _lookup(rootfs / "etc/group", group)
            if gr is None or len(gr) < 3:
                raise ImageError(f"service '{service}': group '{group}' is not in the image's /etc/group")
            gid = int(gr[2])
    else:
        gid = int(pw[3]) if pw else 0
    return uid, gid, ()
