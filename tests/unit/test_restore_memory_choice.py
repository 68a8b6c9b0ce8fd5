"""Which restores map (activator/checkpoints/instance.py InstanceLauncher._maps), with no engine: restore_memory
against a checkpoint's map_hazard, and the operator's one warning per checkpoint. The engine tests
(tests/engine/test_restore_memory*.py) show the same choice on real restores; this is the whole table at once."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

import pytest

from activator.checkpoints.instance import InstanceLauncher
from activator.config.model import ListenAddress, ServiceConfig
from activator.daemon.metrics import Metrics
from activator.runtime.runc import Runc

HAZARD = "jemalloc (/usr/lib/x86_64-linux-gnu/libjemalloc.so.2)"
#: an imported dump maphazard.find could not read (activator/checkpoints/exchange.py): a hazard, but no allocator
UNREAD = "its dump could not be read to look for an allocator that breaks under map (KeyError)"
WARNING = "restore_memory: map is not used: its app has "
NOT_USED = "restore_memory: map is not used: "


@dataclass
class FakeCheckpoint:
    dir: Path
    map_hazard: str = ""


def launcher(tmp_path: Path, mode: str) -> InstanceLauncher:
    cfg = ServiceConfig(name="svc", image="x", listen=(ListenAddress("127.0.0.1", 1),), port=80, restore_memory=mode)
    return InstanceLauncher(cfg, Runc(tmp_path / "runc"), tmp_path / "instances", tmp_path / "logs",
                            Metrics().for_service("svc"), network=None)


@pytest.mark.parametrize(("mode", "hazard", "maps"), [
    ("copy", "", False), ("copy", HAZARD, False),
    ("map", "", True), ("map", HAZARD, False),  # the hazard turns map off
    ("map", UNREAD, False),  # so does a dump that could not be looked at
    ("map-always", "", True), ("map-always", HAZARD, True),  # and only map
])
def test_restore_memory_against_a_checkpoints_hazard(tmp_path: Path, mode: str, hazard: str, maps: bool) -> None:
    got = launcher(tmp_path, mode)._maps(FakeCheckpoint(tmp_path / "ck", hazard))  # type: ignore[arg-type]
    assert got is maps


def test_the_operator_is_told_once_per_checkpoint_and_only_when_map_is_turned_off(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    lnch = launcher(tmp_path, "map")
    first, second = FakeCheckpoint(tmp_path / "ck1", HAZARD), FakeCheckpoint(tmp_path / "ck2", HAZARD)
    for ck in (first, first, second, first, FakeCheckpoint(tmp_path / "ck3")):
        lnch._maps(ck)  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records if WARNING in r.getMessage()]
    assert len(said) == 2, said  # one for each hazardous checkpoint, however many restores it serves
    assert all(s.startswith("service=svc ") and HAZARD in s and "map-always" in s for s in said), said
    caplog.clear()
    always = launcher(tmp_path, "map-always")
    always._maps(first)  # type: ignore[arg-type]
    assert not [r for r in caplog.records if WARNING in r.getMessage()]  # map-always maps: nothing to warn of


def test_the_warning_says_what_the_allocator_does_and_never_calls_an_unread_dump_an_allocator(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING)
    lnch = launcher(tmp_path, "map")
    lnch._maps(FakeCheckpoint(tmp_path / "ck1", HAZARD))  # type: ignore[arg-type]
    lnch._maps(FakeCheckpoint(tmp_path / "ck2", UNREAD))  # type: ignore[arg-type]
    allocator, unread = [r.getMessage() for r in caplog.records if NOT_USED in r.getMessage()]
    assert f"its app has {HAZARD}, which counts on memory it discarded reading back as zeros" in allocator, allocator
    assert "docs/restore-memory.md" in allocator and "restored by copy" in allocator, allocator
    assert f"{NOT_USED}{UNREAD} (docs/restore-memory.md)" in unread, unread  # positive control: the reason is said
    assert "its app has" not in unread and "zeros" not in unread, unread


@pytest.mark.parametrize("mode", ["map", "map-always"])
def test_a_criu_that_cannot_map_restores_by_copy_and_says_so(tmp_path: Path, caplog: pytest.LogCaptureFixture,
                                                                  mode: str) -> None:
    """A CRIU without patch 0003 (settings.criu naming another build) would refuse the restore config's
    mmap-page-image line and fail every restore: the service is restored by copy instead, and told once."""
    caplog.set_level(logging.WARNING)
    lnch = launcher(tmp_path, mode)
    lnch.runc.criu_maps = False
    for ck in (FakeCheckpoint(tmp_path / "ck1"), FakeCheckpoint(tmp_path / "ck2")):
        assert lnch._maps(ck) is False  # type: ignore[arg-type]
    said = [r.getMessage() for r in caplog.records if "cannot restore by mapping" in r.getMessage()]
    assert len(said) == 2 and all("scripts/criu-patches/0003" in s for s in said), said  # once per checkpoint
    lnch.runc.criu_maps = True  # the positive control: the same launcher maps with a CRIU that can
    assert lnch._maps(FakeCheckpoint(tmp_path / "ck3")) is True  # type: ignore[arg-type]
