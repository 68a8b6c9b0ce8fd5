"""The template's output copier (checkpoints/template.py `_copy_pipe`) and descriptor numbers it no longer owns.

Once the app's end of the pipe is gone the transport closes the read end, and the copier resumes later; by then
another thread may have been given that number (builds open files in threads, Popen makes pipes). The copier
used to make "its" number non-blocking and read it to the end, eating another file's data or breaking a Popen's
wait for exec (a Popen then raised with its child running: issue 32's and 33's unexplained CI failures)."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from activator.checkpoints import template


@pytest.mark.asyncio
async def test_the_copier_leaves_a_reused_descriptor_number_alone(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    loop = asyncio.get_running_loop()
    r, w = os.pipe()
    dest = tmp_path / "template.log"
    taken: list[tuple[int, int]] = []  # pipes made while the copier had not resumed yet
    lost = template._Copy.connection_lost

    def grab() -> None:
        # Runs after the transport closed r and before the copier resumes: take that number, as a thread would
        for _ in range(64):
            pr, pw = os.pipe()
            taken.append((pr, pw))
            if pr == r:
                os.write(pw, b"somebody else's data")
                return

    def connection_lost(self: template._Copy, exc: Exception | None) -> None:
        loop.call_soon(grab)  # ahead of the copier's wake-up, which the original schedules
        lost(self, exc)

    monkeypatch.setattr(template._Copy, "connection_lost", connection_lost)
    copier = asyncio.ensure_future(template._copy_pipe(r, dest))
    os.write(w, b"the template's own words\n")
    os.close(w)
    try:
        await asyncio.wait_for(copier, 10)
        # The number was reused before the copier resumed (the race, made certain), so this test can fail
        assert taken and taken[-1][0] == r, "the transport had not closed the pipe when the copier resumed"
        assert os.get_blocking(r), "the copier made another file's descriptor non-blocking"
        assert os.read(r, 100) == b"somebody else's data"  # still there: not eaten
        assert dest.read_bytes() == b"the template's own words\n"
    finally:
        for pr, pw in taken:
            os.close(pr)
            os.close(pw)


async def _turn() -> None:
    """One turn of the loop, without sleeping."""
    fut = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(fut.set_result, None)
    await fut


@pytest.mark.asyncio
async def test_a_cancelled_copier_keeps_what_is_still_in_the_pipe(tmp_path: Path) -> None:
    """The control: cancelled while the app still runs (it is ready, or it failed), the copier takes what the
    pipe holds, so the log an error points at has everything the app said."""
    r, w = os.pipe()
    dest = tmp_path / "template.log"
    copier = asyncio.ensure_future(template._copy_pipe(r, dest))
    for _ in range(100):  # until the copier reads the pipe through its transport (a few loop turns)
        await _turn()
        if dest.exists():
            break
    for _ in range(5):
        await _turn()
    assert dest.exists() and not copier.done()
    os.write(w, b"said before the cancel\n")  # and cancelled at once: the transport has not read it
    copier.cancel()
    with pytest.raises(asyncio.CancelledError):
        await copier
    os.close(w)
    assert dest.read_bytes() == b"said before the cancel\n"
