"""The checkpoint store: one pre-warmed, dumped template per service.

Layout of state_dir/checkpoints/SERVICE/:
    meta.json      what it was made from (image ID, CRIU/runc versions, kernel, service fingerprint) and what it
                   holds (process spec, listening ports, sizes); a mismatch on any "made from" field is stale
    criu/          CRIU's image files, as runc checkpoint wrote them
    diff/          the template's filesystem changes, used read-only as an overlay layer by every instance
    template.log   the template app's output up to the dump

Building: start a template with runc on the image's root filesystem, wait until the app listens on its port
(no probe connection is left open), dump it, keep its upper directory as diff/, read the dump back with pycriu
to confirm the port is really among its listening sockets, then swap the directory into place atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import readiness
from .config import ServiceConfig
from .errors import CheckpointError, StartError
from .images import DockerImageSource, ImageInfo, resolve_user
from .runc import Runc, RuncError
from .sandbox import Sandbox, new_name
from .spec import ProcessSpec, merge_env, process_args
from .tasks import spawn

log = logging.getLogger("activator.checkpoint")

# 2: dumped with network-lock skip (runc.CRIU_CONFIG); a dump made with the lock also pays for it on every
# restore (~60 ms), so older checkpoints are rebuilt.
FORMAT = 2
PROBE_CLOSE_TIMEOUT = 10.0


@dataclass(frozen=True)
class Origin:
    """What a checkpoint was made from; any difference means it must be rebuilt."""

    format: int
    service_fingerprint: str
    image_id: str
    criu: str
    runc: str
    kernel: str

    def differences(self, other: Origin) -> list[str]:
        return [k for k, v in asdict(self).items() if asdict(other)[k] != v]


@dataclass(frozen=True)
class Checkpoint:
    service: str
    dir: Path
    origin: Origin
    process: ProcessSpec
    image_rootfs: Path
    listening_ports: tuple[int, ...]
    created: float
    build_seconds: float
    pages_bytes: int

    @property
    def images(self) -> Path:
        return self.dir / "criu"

    @property
    def diff(self) -> Path:
        return self.dir / "diff"

    @property
    def layers(self) -> list[Path]:
        """Overlay lower dirs for an instance, topmost first."""
        return [self.diff, self.image_rootfs]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["dir"] = str(self.dir)
        d["image_rootfs"] = str(self.image_rootfs)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any], directory: Path) -> Checkpoint:
        p = d["process"]
        return cls(
            service=d["service"],
            dir=directory,
            origin=Origin(**d["origin"]),
            process=ProcessSpec(
                args=tuple(p["args"]), env=tuple(p["env"]), cwd=p["cwd"], uid=p["uid"], gid=p["gid"],
                additional_gids=tuple(p["additional_gids"]),
            ),
            image_rootfs=Path(d["image_rootfs"]),
            listening_ports=tuple(d["listening_ports"]),
            created=d["created"],
            build_seconds=d["build_seconds"],
            pages_bytes=d["pages_bytes"],
        )


# --- reading a dump with pycriu ------------------------------------------------------------------------------


def _load_img(path: Path) -> dict[str, Any]:
    import pycriu

    with open(path, "rb") as f:
        result: dict[str, Any] = pycriu.images.load(f)
    return result


def listening_ports(images: Path) -> tuple[int, ...]:
    """TCP ports the dumped processes listen on, read from CRIU's image files."""
    ports: set[int] = set()
    entries: list[dict[str, Any]] = []
    for name in ("files.img", "inetsk.img"):  # newer CRIU keeps sockets in files.img, older in inetsk.img
        if (images / name).exists():
            entries += _load_img(images / name)["entries"]
    for e in entries:
        isk = e.get("isk", e if "src_port" in e else None)
        if not isk:
            continue
        if isk.get("proto") in ("TCP", 6) and isk.get("state") in ("LISTEN", 10):
            src = isk.get("src_port", [])
            ports.update(int(p) for p in (src if isinstance(src, list) else [src]))
    return tuple(sorted(ports))


def pages_bytes(images: Path) -> int:
    return sum(p.stat().st_size for p in images.glob("pages-*.img"))


def contents(images: Path) -> dict[str, Any]:
    """What a dump holds, read back with pycriu: the process tree, listening ports, memory."""
    procs = []
    for e in _load_img(images / "pstree.img")["entries"]:
        core = images / f"core-{e['pid']}.img"
        comm = _load_img(core)["entries"][0]["tc"].get("comm", "?") if core.exists() else "?"
        mm = images / f"mm-{e['pid']}.img"
        vmas = len(_load_img(mm)["entries"][0].get("vmas", [])) if mm.exists() else 0
        procs.append({"pid": e["pid"], "ppid": e["ppid"], "comm": comm, "threads": len(e.get("threads", [])),
                      "vmas": vmas})
    return {
        "processes": procs,
        "listening_ports": list(listening_ports(images)),
        "pages_bytes": pages_bytes(images),
        "image_files": len(list(images.glob("*.img"))),
    }


# --- the store ---------------------------------------------------------------------------------------------


class CheckpointStore:
    def __init__(self, state_dir: Path) -> None:
        self.root = state_dir / "checkpoints"
        self.images_root = state_dir / "images"
        self.logs = state_dir / "logs"

    def dir(self, service: str) -> Path:
        return self.root / service

    def load(self, service: str) -> Checkpoint | None:
        meta = self.dir(service) / "meta.json"
        try:
            return Checkpoint.from_json(json.loads(meta.read_text()), self.dir(service))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def image_rootfs(self, image: ImageInfo) -> Path:
        return self.images_root / image.short_id / "rootfs"

    def install(self, tmp: Path, checkpoint: Checkpoint) -> Checkpoint:
        """Swap a freshly built checkpoint into place.

        The old one is renamed aside, not deleted: running instances may still have its diff/ mounted as a lower
        layer (a rename does not disturb a mount; deleting would). sweep_retired() removes it once unused.
        """
        final = self.dir(checkpoint.service)
        (tmp / "meta.json").write_text(json.dumps(checkpoint.to_json() | {"dir": str(final)}, indent=2))
        if final.exists():
            os.rename(final, final.with_name(f".retired-{final.name}-{time.time_ns()}"))
        os.rename(tmp, final)
        loaded = self.load(checkpoint.service)
        assert loaded is not None
        return loaded

    def sweep_retired(self, service: str | None = None) -> list[Path]:
        """Delete replaced checkpoints (of one service, or all); call only when no instance uses them."""
        pattern = f".retired-{service}-*" if service else ".retired-*"
        gone = sorted(self.root.glob(pattern)) if self.root.is_dir() else []
        for d in gone:
            shutil.rmtree(d, ignore_errors=True)
        return gone


class CheckpointBuilder:
    """Makes checkpoints. Owns nothing long-lived: every template it starts is released before it returns."""

    def __init__(
        self, store: CheckpointStore, images: DockerImageSource, runc: Runc, instances_dir: Path,
        criu: str, runc_version: str,
    ) -> None:
        self.store = store
        self.images = images
        self.runc = runc
        self.instances_dir = instances_dir
        self.criu = criu
        self.runc_version = runc_version
        # Services sharing an image build at once at startup: unpack it once, not once per service.
        self._unpacking: dict[str, asyncio.Lock] = {}
        # Templates boot for real (a JVM each): more at once than CPUs only makes every one of them slower,
        # and can push a slow one past its readiness timeout.
        self._building = asyncio.Semaphore(os.cpu_count() or 1)

    def origin(self, svc: ServiceConfig, image: ImageInfo) -> Origin:
        return Origin(
            format=FORMAT,
            service_fingerprint=svc.checkpoint_fingerprint(),
            image_id=image.id,
            criu=self.criu,
            runc=self.runc_version,
            kernel=os.uname().release,
        )

    async def ensure(self, svc: ServiceConfig, *, rebuild: bool = False) -> tuple[Checkpoint, bool]:
        """The service's current checkpoint, building it when missing or stale. Returns (checkpoint, built)."""
        image = await asyncio.to_thread(self.images.resolve, svc.image, svc.name)
        wanted = self.origin(svc, image)
        current = self.store.load(svc.name)
        if current is not None and not rebuild:
            stale = current.origin.differences(wanted)
            if not stale and current.images.is_dir() and current.image_rootfs.is_dir():
                return current, False
            log.info("service=%s checkpoint is stale (%s changed); rebuilding", svc.name,
                     ", ".join(stale) or "files missing")
        return await self.build(svc, image, wanted), True

    async def build(self, svc: ServiceConfig, image: ImageInfo, origin: Origin) -> Checkpoint:
        async with self._building:
            return await self._build(svc, image, origin)

    async def _build(self, svc: ServiceConfig, image: ImageInfo, origin: Origin) -> Checkpoint:
        started = time.monotonic()
        rootfs = self.store.image_rootfs(image)
        async with self._unpacking.setdefault(image.id, asyncio.Lock()):
            await asyncio.to_thread(self.images.export_rootfs, image, rootfs)
        process = self._process(svc, image, rootfs)
        self.store.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".build-{svc.name}-", dir=self.store.root))
        sandbox = Sandbox(new_name(svc.name + "-tpl"), self.instances_dir, self.runc)
        try:
            await sandbox.prepare([rootfs], process, svc.resources, hostname=svc.name)
            sandbox.write_hosts(svc.name)
            await self._start_and_wait(svc, sandbox, tmp / "template.log")
            (tmp / "criu").mkdir()
            await sandbox.checkpoint(tmp / "criu")
            await sandbox.release(keep_dir=True)
            os.rename(sandbox.layout.upper, tmp / "diff")
            ports = await asyncio.to_thread(listening_ports, tmp / "criu")
            if svc.port not in ports:
                raise CheckpointError(
                    f"service '{svc.name}': the checkpoint listens on {list(ports) or 'no TCP port'}, not on "
                    f"port {svc.port}; set 'port' to the port the app listens on"
                )
            checkpoint = Checkpoint(
                service=svc.name, dir=tmp, origin=origin, process=process, image_rootfs=rootfs,
                listening_ports=ports, created=time.time(), build_seconds=time.monotonic() - started,
                pages_bytes=pages_bytes(tmp / "criu"),
            )
            return self.store.install(tmp, checkpoint)
        except BaseException as e:
            with contextlib.suppress(Exception):
                self._keep_failure_logs(svc, sandbox, tmp)
            await sandbox.release()
            shutil.rmtree(tmp, ignore_errors=True)
            if isinstance(e, RuncError):  # runc does not know which service it was working for; say it
                raise CheckpointError(f"service '{svc.name}': building its checkpoint failed: {e}; logs in "
                                      f"{self.store.logs}/{svc.name}-*") from e
            raise
        finally:
            shutil.rmtree(sandbox.layout.dir, ignore_errors=True)

    def _keep_failure_logs(self, svc: ServiceConfig, sandbox: Sandbox, tmp: Path) -> None:
        self.store.logs.mkdir(parents=True, exist_ok=True)
        for src, name in ((tmp / "template.log", "template.log"), (sandbox.layout.criu_work / "dump.log", "dump.log"),
                          (tmp / "criu" / "dump.log", "dump.log"), (sandbox.layout.runc_log, "runc.log")):
            if src.exists():
                shutil.copyfile(src, self.store.logs / f"{svc.name}-{name}")

    def _process(self, svc: ServiceConfig, image: ImageInfo, rootfs: Path) -> ProcessSpec:
        args = process_args(image.entrypoint, image.cmd, svc.entrypoint, svc.command)
        if not args:
            raise CheckpointError(
                f"service '{svc.name}': image '{svc.image}' has no Cmd or Entrypoint; set 'command'"
            )
        uid, gid, groups = resolve_user(rootfs, svc.user if svc.user is not None else image.user, svc.name)
        return ProcessSpec(
            args=args,
            env=merge_env(image.env, svc.environment, svc.name),
            cwd=svc.working_dir or image.working_dir or "/",
            uid=uid, gid=gid, additional_gids=groups,
        )

    async def _start_and_wait(self, svc: ServiceConfig, sandbox: Sandbox, output: Path) -> None:
        # The template's stdio must be a pipe: CRIU cannot dump a descriptor on a host file outside the
        # container, and runc hands pipes over to the restored instance's own stdio on restore.
        r, w = os.pipe()
        copier = spawn(_copy_pipe(r, output), name=f"template-output:{svc.name}", awaited=True)
        try:
            await sandbox.start(stdout=w, stderr=w)
        finally:
            os.close(w)
        try:
            budget = svc.readiness.timeout
            deadline = time.monotonic() + budget
            problem = await sandbox.wait_listening(svc.port, budget)
            if problem == "exited":
                raise StartError(
                    f"service '{svc.name}': the app exited before listening on port {svc.port}; "
                    f"see {self._log_hint(svc)}"
                )
            if problem is not None:
                raise StartError(
                    f"service '{svc.name}': the app did not listen on port {svc.port} within {budget:g}s; "
                    f"check 'port' or raise 'readiness.timeout' (app output: {self._log_hint(svc)})"
                )
            pid = await sandbox.pid()
            if pid is None:
                raise StartError(f"service '{svc.name}': the app exited right after it started listening; "
                                 f"see {self._log_hint(svc)}")
            if svc.readiness.http_path:
                before = readiness.held_sockets(pid)
                await self._wait_http(svc, sandbox, deadline)
                # The dump must not capture the probe's connection (CRIU cannot restore it); the app may
                # close its end lazily, so wait for the descriptor itself to go.
                if not await readiness.wait_until(
                    lambda: not readiness.stray_connections(pid, before), timeout=PROBE_CLOSE_TIMEOUT,
                ):
                    raise StartError(
                        f"service '{svc.name}': the app kept the readiness probe's connection open for "
                        f"{PROBE_CLOSE_TIMEOUT:g}s after 'Connection: close'; drop 'readiness.http_path'"
                    )
        finally:
            copier.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await copier

    async def _wait_http(self, svc: ServiceConfig, sandbox: Sandbox, deadline: float) -> None:
        path = svc.readiness.http_path
        assert path is not None

        async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
            sock = sandbox.netns.socket()
            try:
                await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", svc.port))
            except BaseException:
                sock.close()
                raise
            return await asyncio.open_connection(sock=sock)

        while time.monotonic() < deadline:
            if await readiness.http_ok(connect, svc.port, path):
                return
            await asyncio.sleep(0.1)
        raise StartError(
            f"service '{svc.name}': GET {path} on port {svc.port} did not answer 2xx/3xx within "
            f"{svc.readiness.timeout:g}s; fix 'readiness.http_path' or raise 'readiness.timeout'"
        )

    def _log_hint(self, svc: ServiceConfig) -> Path:
        return self.store.logs / f"{svc.name}-template.log"


async def _copy_pipe(fd: int, dest: Path) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    pipe = os.fdopen(fd, "rb", buffering=0)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), pipe)
    try:
        with open(dest, "ab") as out:  # noqa: ASYNC230 - a local log file, written in small chunks
            while chunk := await reader.read(65536):
                out.write(chunk)
                out.flush()
    finally:
        transport.close()
