"""A refill due later (a standby's replacement, STANDBY_REFILL_DELAY after its thaw: activator/checkpoints/instance.py
`_refill_later`), against a reload that replaces the checkpoint meanwhile: drop_slots_except(new) cancels it, or it
would fire after the drop and make slots and standbys of the replaced checkpoint again (standbys of the old app,
holding the standby count the new one needs, and slots over a diff/ the sweep removes). No engine: the launcher's
own timer, the loop's clock not waited on."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import cast

import pytest

from activator.checkpoints.instance import InstanceLauncher
from activator.checkpoints.store import Checkpoint
from activator.config.model import ListenAddress, ServiceConfig
from activator.daemon.metrics import Metrics
from activator.runtime.runc import Runc


@dataclass(eq=False)
class FakeCheckpoint:
    dir: Path


def fake(path: Path) -> Checkpoint:
    return cast(Checkpoint, FakeCheckpoint(path))


def launcher(tmp_path: Path) -> tuple[InstanceLauncher, list[object]]:
    cfg = ServiceConfig(name="svc", image="x", listen=(ListenAddress("127.0.0.1", 1),), port=80)
    lnch = InstanceLauncher(cfg, Runc(tmp_path / "runc"), tmp_path / "instances", tmp_path / "logs",
                            Metrics().for_service("svc"), network=None)
    refilled: list[object] = []
    lnch.refill = refilled.append  # type: ignore[method-assign,assignment]
    return lnch, refilled


@pytest.mark.asyncio
async def test_a_refill_due_for_a_replaced_checkpoint_is_cancelled(tmp_path: Path) -> None:
    lnch, refilled = launcher(tmp_path)
    old, new = fake(tmp_path / "old"), fake(tmp_path / "new")
    lnch._refill_later(old, 3600.0)  # due long after this test: only cancelling ends it
    assert lnch._refill_due is not None
    due = lnch._refill_due[0]
    await lnch.drop_slots_except(new)
    assert due.cancelled() and lnch._refill_due is None
    # control: the same reload keeping the checkpoint leaves its refill due
    lnch._refill_later(new, 3600.0)
    kept = lnch._refill_due
    await lnch.drop_slots_except(new)
    assert kept is not None and lnch._refill_due is kept and not kept[0].cancelled()
    await lnch.close()  # and shutdown cancels it
    assert kept[0].cancelled() and refilled == []


@pytest.mark.asyncio
async def test_a_refill_due_runs_with_its_checkpoint(tmp_path: Path) -> None:
    lnch, refilled = launcher(tmp_path)
    ck = fake(tmp_path / "ck")
    lnch._refill_later(ck, 0.0)
    lnch._refill_later(ck, 0.0)  # a second thaw before it is due: one refill, not two
    loop = asyncio.get_running_loop()
    for _ in range(100):  # passes of the loop, no waiting: call_later(0) is due on one of the next
        if refilled:
            break
        turn = loop.create_future()
        loop.call_soon(turn.set_result, None)
        await turn
    assert refilled == [ck] and lnch._refill_due is None
