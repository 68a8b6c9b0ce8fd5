"""PostgreSQL, a non-root app (it runs as user postgres) with its data in a volume, checkpointed and restored in
its user namespace on this host, where root lacks CAP_SYS_RESOURCE and the same app cannot be checkpointed
without one (tests/engine/test_criu_errors.py). Real clients: psql."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.conftest import eventually

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

POSTGRES = "activator-test/postgres:latest"
PG = {"image": POSTGRES, "port": 5432, "volumes": ["pgdata:/var/lib/postgresql/data"],
      # it listens before it accepts ("the database system is starting up"): dumped once pg_isready says it
      # accepts, over its unix socket (no TCP state in the dump)
      "readiness": {"timeout": "120s", "command": ["pg_isready", "-q", "-h", "/tmp"]}, "idle_timeout": "1s",
      "stop_grace": "10s"}


def _image_missing() -> bool:
    return subprocess.run(["docker", "image", "inspect", POSTGRES], capture_output=True).returncode != 0


async def psql(port: int, sql: str) -> str:
    out = await asyncio.to_thread(
        subprocess.run, ["psql", "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "-d", "postgres", "-X", "-q",
                         "-A", "-t", "-v", "ON_ERROR_STOP=1", "-c", sql],
        capture_output=True, text=True, timeout=120, env=os.environ | {"PGCONNECT_TIMEOUT": "30"})
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


@pytest.mark.skipif(shutil.which("psql") is None, reason="needs psql (make setup installs postgresql-client)")
async def test_postgres_is_restored_keeps_its_data_and_runs_as_its_own_user(start) -> None:  # type: ignore[no-untyped-def]
    if _image_missing():
        pytest.fail(f"image {POSTGRES} missing: scripts/build-images.sh postgres")
    run = await start({"pg": PG})
    svc = run.act.services["pg"]
    checkpoint = svc.checkpoint
    assert checkpoint is not None and checkpoint.idmap is not None
    assert checkpoint.process.uid != 0  # the image's USER postgres
    # It holds files of its data volume open for writing: stateful (one instance, its checkpoint made again)
    assert any(f.startswith("/var/lib/postgresql/data/") for f in checkpoint.writes_volumes)

    assert await psql(run.port("pg"), "CREATE TABLE kept (x int); INSERT INTO kept VALUES (42); "
                                      "SELECT sum(x) FROM kept") == "42"
    assert run.metric("activator_restores_total", "pg") == 1  # restored, not cold-started
    (inst,) = svc.instances
    pid = await inst.sandbox.pid()
    assert pid is not None
    uids = next(ln for ln in Path(f"/proc/{pid}/status").read_text().splitlines() if ln.startswith("Uid:"))
    assert uids.split()[1] == str(checkpoint.idmap.host + checkpoint.process.uid)  # postgres, in the range
    assert await psql(run.port("pg"), "SELECT current_user") == "postgres"

    await eventually(lambda: not svc.instances, timeout=60, what="the idle instance reaped")
    # The next instance is restored from a checkpoint made again from the volume as the first left it (from the
    # old one it would see the database as it was before the table, and could write over it).
    assert await psql(run.port("pg"), "SELECT sum(x) FROM kept") == "42"
    assert run.metric("activator_restores_total", "pg") == 2
    assert run.metric("activator_checkpoint_builds_total", "pg") == 2
    assert svc.checkpoint is not None and svc.checkpoint is not checkpoint
