"""The exporter as a scraper sees it, from a real daemon's metrics endpoint: versions, process metrics,
checkpoint size and age, and a checkpoint marked outdated when its image reference moves to another image."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import time
from collections.abc import Iterator

import pytest
from prometheus_client.parser import text_string_to_metric_families

from activator import __version__
from tests.conftest import BUSYBOX, ECHO, echo, eventually

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

MOVING = "activator-test/moving:latest"


def samples(act) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:  # type: ignore[no-untyped-def]
    from prometheus_client import generate_latest

    text = generate_latest(act.metrics.registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


@pytest.fixture
def moving_image() -> Iterator[str]:
    subprocess.run(["docker", "tag", BUSYBOX, MOVING], check=True, capture_output=True)
    yield MOVING
    subprocess.run(["docker", "rmi", "-f", MOVING], capture_output=True)


async def test_versions_process_and_checkpoint_series(start) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO})
    got = samples(run.act)
    (info,) = [dict(labels) for (name, labels), v in got.items() if name == "activator_build_info" and v == 1]
    assert info["version"] == __version__ and info["criu"].startswith("4.") and info["runc"].startswith("1.")
    assert got[("process_resident_memory_bytes", ())] > 10 * 2**20
    assert got[("activator_checkpoint_pages_bytes", (("service", "echo"),))] > 0
    created = got[("activator_checkpoint_created_timestamp_seconds", (("service", "echo"),))]
    assert time.time() - 600 < created <= time.time()
    assert got[("activator_checkpoint_outdated", (("service", "echo"),))] == 0
    assert not [name for name, _ in got if name.endswith("_created")]


async def test_a_moved_image_reference_marks_the_checkpoint_outdated(start, moving_image, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    from activator.daemon import watchers

    monkeypatch.setattr(watchers, "IMAGE_CHECK_INTERVAL", 0.2)
    run = await start({"echo": ECHO | {"image": moving_image}})
    key = ("activator_checkpoint_outdated", (("service", "echo"),))
    await asyncio.sleep(0.5)
    assert samples(run.act)[key] == 0
    # `docker pull` of a new version, as far as the reference is concerned: another image under the same name
    build = await asyncio.to_thread(subprocess.run, ["docker", "build", "-q", "-t", moving_image, "-"],
                                    input=f"FROM {BUSYBOX}\nLABEL v=2\n", capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    await eventually(lambda: samples(run.act)[key] == 1, what="the checkpoint marked outdated")
    assert any("checkpoint --rebuild echo" in r.getMessage() for r in caplog.records)
    # nothing else changes: it keeps serving from the checkpoint it has
    assert await echo(run.port("echo"), b"still") == b"still"


async def test_a_slow_template_says_it_is_still_waiting(start, monkeypatch, caplog) -> None:  # type: ignore[no-untyped-def]
    from activator.checkpoints import template

    monkeypatch.setattr(template, "PROGRESS_EVERY", 0.3)
    caplog.set_level(logging.INFO, logger="activator")
    slow = ECHO | {"command": ["sh", "-c", "sleep 1.2; exec echo-server 9000"]}
    run = await start({"slow": slow})
    waits = [r.getMessage() for r in caplog.records if "still waiting" in r.getMessage()]
    assert waits and all(m.startswith("service=slow still waiting for the app to listen on port 9000 (")
                         for m in waits)
    assert await echo(run.port("slow"), b"late but there") == b"late but there"



async def test_an_image_no_checkpoint_uses_any_more_is_pruned(start, moving_image) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO | {"image": moving_image}})
    state = run.config.settings.state_dir
    images = state / "images"
    (old,) = [d for d in images.iterdir() if not d.name.startswith(".")]
    build = await asyncio.to_thread(subprocess.run, ["docker", "build", "-q", "-t", moving_image, "-"],
                                    input=f"FROM {BUSYBOX}\nLABEL v=3\n", capture_output=True, text=True, timeout=120)
    assert build.returncode == 0, build.stderr
    await run.act.rebuild("echo")  # `docker pull` then `activator checkpoint --rebuild`: the new image unpacked
    await eventually(lambda: not list((state / "checkpoints").glob(".retired-*")), what="the old checkpoint swept")
    new = run.act.services["echo"].checkpoint.image_rootfs.parent
    assert new != old and old.is_dir()
    assert await run.act.fleet.host.builder.prune_images() == [old]
    assert not old.exists() and new.is_dir()
    assert await echo(run.port("echo"), b"still served") == b"still served"
