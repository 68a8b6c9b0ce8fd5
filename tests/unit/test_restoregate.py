"""RestoreGate (activator/checkpoints/restoregate.py): restores take turns, and slot preparation waits for a
moment with none under way or queued, bounded."""

from __future__ import annotations

import asyncio

import pytest

from activator.checkpoints.restoregate import RestoreGate


async def ticks(n: int = 1) -> None:
    """Let the loop run n rounds (no time passes)."""
    loop = asyncio.get_running_loop()
    for _ in range(n):
        done = loop.create_future()
        loop.call_soon(done.set_result, None)
        await done


@pytest.mark.asyncio
async def test_at_most_at_once_restores_run_and_the_rest_queue() -> None:
    gate, running, most, release = RestoreGate(2), 0, 0, asyncio.Event()

    async def restore() -> None:
        nonlocal running, most
        async with gate.turn():
            running += 1
            most = max(most, running)
            await release.wait()
            running -= 1

    tasks = [asyncio.ensure_future(restore()) for _ in range(5)]
    await ticks(5)
    assert (running, gate.pending) == (2, 5)  # two under way, three queued: all five pending
    release.set()
    await asyncio.gather(*tasks)
    assert most == 2 and gate.pending == 0


@pytest.mark.asyncio
async def test_slot_preparation_waits_until_no_restore_is_pending() -> None:
    gate, release = RestoreGate(1), asyncio.Event()
    await gate.quiet(60)  # nothing pending: at once (a 60 s wait would hang the test)

    async def restore() -> None:
        async with gate.turn():
            await release.wait()

    restores = [asyncio.ensure_future(restore()) for _ in range(2)]
    await ticks()
    waiting = asyncio.ensure_future(gate.quiet(60))
    await ticks(5)
    assert not waiting.done()  # one under way and one queued
    release.set()
    await asyncio.gather(*restores)
    await asyncio.wait_for(waiting, 5)


@pytest.mark.asyncio
async def test_a_stream_of_restores_cannot_starve_slot_preparation() -> None:
    gate, release = RestoreGate(1), asyncio.Event()

    async def restore() -> None:
        async with gate.turn():
            await release.wait()

    task = asyncio.ensure_future(restore())
    await ticks()
    await gate.quiet(0)  # bounded: gives up at once with a restore still under way
    assert gate.pending == 1
    release.set()
    await task
