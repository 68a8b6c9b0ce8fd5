"""Issue 33 goal 5: the page files of an instance restored with `restore_memory: map` stay put under it.

Its memory is a private mapping of its checkpoint's pages-N.img: a rename or an unlink of the file leaves the
mapping as it is (the mapping holds the inode), but a rewrite in place would change the app's memory under it (the
kernel discards even the pages the app wrote: docs/research/restore-by-mapping.md 6). activator never writes into
an installed checkpoint (builds, imports and their image rewrites happen in a scratch directory renamed into
place: store.install), so a rebuild, a reload, a sweep of the retired checkpoint and dropped page cache must all
leave a running instance's memory exactly as it was. And the images are app memory: neither a local user nor the
instance itself may open them.
"""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import Running, eventually
from tests.engine.test_restore_memory_apps import REDIS_IMAGE, Redis, mapped_pages, need_image, populated, redis_digest

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

KEEP = 20_000  # 100-byte values: about 2 MiB of jemalloc runs in the dump, long enough to be mapped
# map-always, not map: Redis links jemalloc, so under map its checkpoint has a hazard and is restored by copy (nothing
# mapped, nothing here to prove). These tests free nothing the dump held (no FLUSHDB, deletes or MEMORY PURGE), so
# jemalloc has no purged extent of it to hand out as zeroed: the mapping itself is what they hold to account.
REDIS = {"image": REDIS_IMAGE, "port": 6379,
         "command": ["redis-server", "--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no",
                     "--enable-debug-command", "yes"],
         "warmup": {"payload": f"DEBUG POPULATE {KEEP} keep 100\r\nPING\r\n", "count": 1},
         "idle_timeout": "10m", "restore_memory": "map-always"}


def dataset(*extra: tuple[bytes, bytes]) -> dict[int, dict[bytes, bytes]]:
    return {0: {f"keep:{i}".encode(): populated("keep", i, 100) for i in range(KEEP)} | dict(extra)}


def image_digests(images: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(images.glob("pages-*.img"))}


def mapped_runs(pid: int) -> list[str]:
    """/proc/PID/maps lines of the page images the app's memory is mapped from."""
    return [ln for ln in Path(f"/proc/{pid}/maps").read_text().splitlines() if "/pages-" in ln]


async def same_memory(r: Redis, want: dict[int, dict[bytes, bytes]]) -> None:
    assert await r.call("GET", "keep:4321") == populated("keep", 4321, 100)
    assert await r.call("DEBUG", "DIGEST") == redis_digest(want)


async def command(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(subprocess.run, argv, capture_output=True, text=True, timeout=30)


def start_redis(start: Any, **settings: Any) -> Any:
    need_image(REDIS_IMAGE, "redis")
    # drain_timeout: a reload lets the old definition's instance finish; long enough for the checks made on it
    return start({"redis": REDIS}, drain_timeout="10m", **settings)


async def test_a_mapped_instance_keeps_its_memory_through_rebuild_reload_sweep_and_dropped_caches(start) -> None:  # type: ignore[no-untyped-def]
    run: Running = await start_redis(start)
    act = run.act
    first = act.services["redis"].checkpoint
    assert first is not None
    before = image_digests(first.images)
    assert before

    r = await Redis.connect(run.port("redis"))  # restores the instance; this connection stays on it throughout
    try:
        await r.call("SET", "written-after-restore", "yes")  # copy-on-write: never reaches the image
        want = dataset((b"written-after-restore", b"yes"))
        await same_memory(r, want)
        (inst,) = act.services["redis"].instances
        pid = await inst.sandbox.pid()
        assert pid is not None
        assert mapped_pages(run, "redis") > 0
        runs = mapped_runs(pid)
        assert runs and all(str(first.images) + "/pages-" in ln for ln in runs)  # positive control: mapped from there

        # (a) the checkpoint is rebuilt: the old one is renamed aside, never written
        await act.rebuild("redis")
        rebuilt = act.services["redis"].checkpoint
        assert rebuilt is not None and rebuilt.created > first.created
        retired = list(first.dir.parent.glob(".retired-redis-*"))
        assert len(retired) == 1 and image_digests(retired[0] / "criu") == before
        await same_memory(r, want)

        # (b) a reload replaces the service (a changed environment: a new checkpoint); the old instance drains
        old_service = act.services["redis"]
        body = yaml.safe_load(run.config.path.read_text())
        body["services"]["redis"]["environment"] = {"GENERATION": "2"}
        run.config.path.write_text(yaml.safe_dump(body))
        await act.reload()

        def built_for_new_definition() -> bool:
            ck = act.services["redis"].checkpoint
            return act.services["redis"] is not old_service and ck is not None and ck.origin != rebuilt.origin

        await eventually(built_for_new_definition, timeout=120, what="the new definition's checkpoint")
        current = act.services["redis"].checkpoint
        assert current is not None
        current_pages = image_digests(current.images)
        await same_memory(r, want)

        # (c) every retired checkpoint swept. The daemon waits for the old instances to go (the replaced
        # definition sweeps nothing); here the store's sweep runs while the mapped instance still does, as an
        # operator cleaning state_dir would: its files are unlinked, the mapping keeps the inode.
        assert len(list(first.dir.parent.glob(".retired-redis-*"))) == 2  # the first and the rebuilt one
        assert act.fleet.host is not None
        gone = act.fleet.host.builder.store.sweep_retired("redis")
        assert len(gone) == 2 and not list(first.dir.parent.glob(".retired-redis-*"))
        assert all(ln.endswith("(deleted)") for ln in mapped_runs(pid))
        await same_memory(r, want)

        # (d) page cache dropped: what the instance had not written comes back from the disk, as it was
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        await same_memory(r, want)
        assert await inst.sandbox.pid() == pid and await r.call("GET", "written-after-restore") == b"yes"
    finally:
        r.close()

    # and a fresh restore right after dropped caches maps the current checkpoint and has its data
    fresh = await Redis.connect(run.port("redis"))
    try:
        await same_memory(fresh, dataset())
        await fresh.call("SET", "written-after-restore", "again")
        await eventually(lambda: act.services["redis"].instances, what="the new definition's instance")
        (new_inst,) = act.services["redis"].instances
        assert new_inst is not inst and mapped_pages(run, "redis") > 0
    finally:
        fresh.close()
    assert image_digests(current.images) == current_pages  # what the instances wrote never reached the images


async def test_nobody_but_root_can_read_page_images_and_the_instance_cannot_open_its_own(start) -> None:  # type: ignore[no-untyped-def]
    run: Running = await start_redis(start)
    svc = run.act.services["redis"]
    ck = svc.checkpoint
    assert ck is not None and ck.idmap is not None  # userns: private, the default
    r = await Redis.connect(run.port("redis"))
    try:
        await same_memory(r, dataset())
        (inst,) = svc.instances
        pid = await inst.sandbox.pid()
        assert pid is not None and mapped_pages(run, "redis") > 0
        pages = sorted(ck.images.glob("pages-*.img"))
        assert pages

        # Modes: the images are root's, readable by the service's own range (CRIU opens them inside its user
        # namespace) and by nobody else; nothing on the way to them lets others through.
        for d in (ck.dir, ck.images):
            st = d.stat()
            assert st.st_uid == 0 and st.st_mode & 0o777 in (0o700, 0o710), (d, oct(st.st_mode))
        for p in ck.images.iterdir():
            st = p.stat()
            assert st.st_uid == 0 and st.st_gid in (0, ck.idmap.host) and st.st_mode & 0o777 in (0o600, 0o640), \
                (p, oct(st.st_mode))
        # CRIU's restore log (the instance's memory layout) is in the instance's directory: others never pass
        assert inst.sandbox.layout.dir.stat().st_mode & 0o007 == 0
        restore_log = inst.sandbox.layout.criu_work / "restore.log"

        # A local unprivileged user: refused. Root (positive control): the same files read.
        for secret in (pages[0], restore_log):
            nobody = await command(["setpriv", "--reuid", "65534", "--regid", "65534", "--clear-groups",
                                    "head", "-c", "1", str(secret)])
            assert nobody.returncode != 0 and "Permission denied" in nobody.stderr, nobody
            assert secret.read_bytes()[:4096]

        # The instance itself, with every capability in its user namespace (a shell entered into all of its
        # namespaces), reads where its memory comes from in /proc/1/maps (positive control) but cannot open the
        # file through /proc/1/map_files (the kernel asks for CAP_CHECKPOINT_RESTORE in the initial user
        # namespace), nor by its path (not in its mount namespace).
        run_line = mapped_runs(pid)[0]
        span, path = run_line.split()[0], run_line.split()[-1]
        script = (f"grep -c /pages- /proc/1/maps; readlink /proc/1/map_files/{span}; "
                  f"head -c 1 /proc/1/map_files/{span} >/dev/null && echo OPENED-MAP-FILE; "
                  f"head -c 1 {path} >/dev/null && echo OPENED-PATH; echo done")
        inside = await command(["nsenter", "-t", str(pid), "-a", "sh", "-c", script])
        lines = inside.stdout.splitlines()
        assert lines and int(lines[0]) > 0 and lines[-1] == "done", inside
        assert path in inside.stdout  # readlink names it: visible, as docs/restore-memory.md says
        assert "OPENED" not in inside.stdout, inside
        assert "Operation not permitted" in inside.stderr and "No such file or directory" in inside.stderr, inside
        # from the host's root the same map_files entry opens: the refusal above is the user namespace's
        assert len(await asyncio.to_thread(Path(f"/proc/{pid}/map_files/{span}").read_bytes)) > 0
        await same_memory(r, dataset())  # and the app is untouched by all this
    finally:
        r.close()
