"""The Docker engine (or Podman, through its Docker-compatible API: settings.images) as an image source.

The engine resolves a reference to an image ID and hands over the image config and a flat root filesystem; nothing
runs under Docker. Root filesystems are unpacked once per image ID into the state directory and then shared,
read-only, as the lowest overlay layer of the template and of every instance.

Unpacking goes through a container that is created (never started) and exported. It carries a label naming the
state_dir it unpacks for, so a run killed in the middle leaves nothing the next start cannot find and remove
(remove_leftovers); it is removed with its anonymous volumes (an image's VOLUMEs get one each on create).

Blocking calls (the SDK is synchronous): callers run them in a thread.
"""

from __future__ import annotations

import contextlib
import errno
import io
import os
import shutil
import subprocess
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from activator.config.settings import DEFAULT_ENGINE_SOCKETS, ImageSettings
from activator.errors import ImageError, PreflightError
from activator.runtime import imagefs

#: label on the short-lived containers used to export images; its value is the state_dir they unpack for
UNPACK_LABEL = "org.activator.unpack-for"


@dataclass(frozen=True)
class ImageInfo:
    id: str  # sha256:...
    ref: str
    env: tuple[str, ...]
    cmd: tuple[str, ...]
    entrypoint: tuple[str, ...]
    working_dir: str
    user: str
    stop_signal: str = ""  # the image's STOPSIGNAL, if it has one
    volumes: tuple[str, ...] = ()  # the image's VOLUME paths
    digest: str = ""  # a registry's name for it (REPO@sha256:...), if it came from or went to one

    @property
    def short_id(self) -> str:
        return self.id.split(":", 1)[-1][:16]


def _client(settings: ImageSettings) -> Any:
    import docker  # imported here: `activator validate` must work without an engine

    socket = settings.socket
    if socket is None and (settings.engine == "podman" or not os.environ.get("DOCKER_HOST")):
        socket = DEFAULT_ENGINE_SOCKETS[settings.engine]
    where = f"at {socket}" if socket is not None else f"at DOCKER_HOST={os.environ.get('DOCKER_HOST')}"
    try:
        client = docker.DockerClient(base_url=f"unix://{socket}", timeout=120) if socket is not None else \
            docker.from_env(timeout=120)
        client.ping()
    except Exception as e:
        fix = ("start its API: `systemctl enable --now podman.socket`, or `podman system service --time=0 "
               f"unix://{socket}`") if settings.engine == "podman" else \
            "start dockerd (make setup does) or set DOCKER_HOST"
        raise PreflightError(f"cannot reach the {settings.name} engine {where} ({type(e).__name__}); {fix}, or "
                             "change settings.images") from None
    return client


class ImageSource:
    """Images from the engine settings.images names (Docker, or Podman through its Docker-compatible API)."""

    def __init__(self, state_dir: Path, settings: ImageSettings | None = None) -> None:
        self.state_dir = state_dir
        self.settings = settings or ImageSettings()
        self._docker: Any = None

    @property
    def docker(self) -> Any:
        if self._docker is None:
            self._docker = _client(self.settings)
        return self._docker

    def resolve(self, ref: str, service: str) -> ImageInfo:
        import docker.errors

        try:
            image = self.docker.images.get(ref)
        except docker.errors.ImageNotFound:
            tool = self.settings.engine
            raise ImageError(
                f"service '{service}': image '{ref}' is not in the local {self.settings.name} engine; "
                f"build or pull it ({tool} pull {ref}" + (", or make images for the demo images)" if tool == "docker"
                                                         else ")")
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
            stop_signal=cfg.get("StopSignal") or "",
            volumes=tuple(sorted(cfg.get("Volumes") or {})),
            digest=next(iter(image.attrs.get("RepoDigests") or ()), ""),
        )

    def export_rootfs(self, image: ImageInfo, dest: Path) -> None:
        """Unpack the image's filesystem into dest (created atomically: a crash leaves no half tree)."""
        if dest.is_dir():
            return
        dest.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".unpack-", dir=dest.parent))
        container = self.docker.containers.create(image.id, command=["/"], entrypoint=[""],
                                                  labels={UNPACK_LABEL: str(self.state_dir)})
        try:
            # tar's complaints go to a file, not a pipe: on a full disk it writes one per file, and a full stderr
            # pipe would block it while we block writing its stdin.
            with tempfile.TemporaryFile() as errors, subprocess.Popen(
                ["tar", "-x", "--numeric-owner", "-C", str(tmp)], stdin=subprocess.PIPE, stderr=errors,
            ) as tar:
                assert tar.stdin is not None
                with contextlib.suppress(BrokenPipeError):  # tar gave up: its exit status and stderr say why
                    for chunk in container.export():
                        tar.stdin.write(chunk)
                    tar.stdin.close()
                if tar.wait() != 0:
                    errors.seek(0)
                    err = errors.read(65536).decode(errors="replace").strip()
                    first = err.splitlines()[0][:200] if err else f"tar exited with {tar.returncode}"
                    if "No space left on device" in err:
                        raise OSError(errno.ENOSPC, first)
                    raise ImageError(f"unpacking image '{image.ref}' failed: {first}")
            # A container's / is 0755 under Docker; mkdtemp made it 0700 (the state dir above is private).
            os.chmod(tmp, 0o755)
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
                container.remove(force=True, v=True)

    def account_files(self, image: ImageInfo, dest: Path) -> bool:
        """The image's /etc/passwd and /etc/group copied under dest (as dest/etc/...), for resolve_user, without
        unpacking the image: what `activator validate` checks a service's user against. False when either is not a
        regular file the engine hands over (a symlink, say): the build resolves it in the unpacked image then."""
        container = self.docker.containers.create(image.id, command=["/"], entrypoint=[""],
                                                  labels={UNPACK_LABEL: str(self.state_dir)})
        try:
            (dest / "etc").mkdir(parents=True, exist_ok=True)
            for name in ("passwd", "group"):
                try:
                    chunks, _ = container.get_archive(f"/etc/{name}")
                except Exception:  # not in the image (docker.errors.NotFound): as resolve_user sees an empty file
                    continue
                data = b"".join(chunks)
                with tarfile.open(fileobj=io.BytesIO(data)) as tar:
                    member = next(iter(tar.getmembers()), None)
                    if member is None or not member.isreg() or member.size > imagefs.MAX_FILE:
                        return False
                    f = tar.extractfile(member)
                    assert f is not None
                    (dest / "etc" / name).write_bytes(f.read())
            return True
        finally:
            with contextlib.suppress(Exception):
                container.remove(force=True, v=True)

    def remove_leftovers(self) -> list[str]:
        """Export containers a killed run of this state_dir left (and their volumes). Best effort: an engine
        that is down has nothing to say, and the next start tries again."""
        try:
            found = self.docker.containers.list(all=True, filters={"label": f"{UNPACK_LABEL}={self.state_dir}"})
        except Exception:
            return []
        removed = []
        for c in found:
            with contextlib.suppress(Exception):
                c.remove(force=True, v=True)
                removed.append(c.short_id)
        return removed


def _lines(rootfs: Path, path: str) -> list[str]:
    """The image's file, resolved inside the image (imagefs): its symlinks can never reach the host's files."""
    return (imagefs.read_text(rootfs, path) or "").splitlines()


def _lookup(rootfs: Path, path: str, name: str) -> list[str] | None:
    for line in _lines(rootfs, path):
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
        pw = _by_uid(rootfs, uid)  # for its primary group and name, as Docker does
    else:
        pw = _lookup(rootfs, "/etc/passwd", name)
        if pw is None or len(pw) < 4 or not pw[2].isdigit():
            raise ImageError(f"service '{service}': user '{name}' is not in the image's /etc/passwd")
        uid = int(pw[2])
    if group:
        if group.isdigit():
            gid = int(group)
        else:
            gr = _lookup(rootfs, "/etc/group", group)
            if gr is None or len(gr) < 3 or not gr[2].isdigit():
                raise ImageError(f"service '{service}': group '{group}' is not in the image's /etc/group")
            gid = int(gr[2])
    else:
        gid = int(pw[3]) if pw and len(pw) > 3 and pw[3].isdigit() else 0
    return uid, gid, _supplementary(rootfs, pw[0] if pw else None, gid)


def _by_uid(rootfs: Path, uid: int) -> list[str] | None:
    for line in _lines(rootfs, "/etc/passwd"):
        fields = line.split(":")
        if len(fields) > 3 and fields[2] == str(uid):
            return fields
    return None


def _supplementary(rootfs: Path, user: str | None, primary: int) -> tuple[int, ...]:
    """The groups of /etc/group that list the user as a member (what `docker run --user NAME` gives)."""
    if user is None:
        return ()
    gids: list[int] = []
    for line in _lines(rootfs, "/etc/group"):
        fields = line.split(":")
        if len(fields) > 3 and fields[2].isdigit() and user in fields[3].split(","):
            gid = int(fields[2])
            if gid != primary and gid not in gids:
                gids.append(gid)
    return tuple(gids)
