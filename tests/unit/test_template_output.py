"""The template's output copier (checkpoints/template.py OutputCopier) and the pipe's read end, which it alone owns.

The copier used to hand the descriptor to a read-pipe transport and keep using the number: once the app's output
ended, the transport had closed it (uvloop closes it twice: MagicStack/uvloop#763), and the copier's cleanup made
"its" number non-blocking and read it to the end, by then possibly another thread's file (a build's, or a Popen's
exec-status pipe, which then raises with its child running). Now the loop only watches the descriptor, and close()
closes it once."""

from __future__ import annotations

import asyncio
import errno
import os
from pathlib import Path

import pytest

from activator.checkpoints import template
from activator.checkpoints.template import OutputCopier


def _closed(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError as e:
        return e.errno == errno.EBADF
    return False


@pytest.mark.asyncio
async def test_the_descriptor_is_closed_once_by_close_and_a_reused_number_is_left_alone(tmp_path: Path) -> None:
    r, w = os.pipe()
    dest = tmp_path / "template.log"
    copier = OutputCopier(r, dest)
    os.write(w, b"the template's own words\n")
    os.close(w)  # the app and all that held the pipe are gone
    await asyncio.wait_for(asyncio.shield(copier.ended), 10)
    assert not _closed(r), "closed behind the copier's back: the number could be reused while it still uses it"
    copier.close()
    assert _closed(r)
    pr, pw = os.pipe()  # what another thread would be given next: the number the copier closed
    try:
        assert pr == r, "the premise: the number was reused (without it the checks below would prove nothing)"
        os.write(pw, b"somebody else's data")
        copier.close()  # a second close (a start that failed after a cancel) touches nothing
        for _ in range(10):
            await _turn()
        assert not _closed(pr) and os.get_blocking(pr), "the copier touched a descriptor it no longer owns"
        assert os.read(pr, 100) == b"somebody else's data"
        assert dest.read_bytes() == b"the template's own words\n"
    finally:
        os.close(pr)
        os.close(pw)


@pytest.mark.asyncio
async def test_close_takes_what_the_loop_has_not_read_yet(tmp_path: Path) -> None:
    """The start is over (ready, or failed) while the app still runs: what it wrote, which the loop has not read,
    goes to the log too, so the error that names the log shows everything the app said."""
    r, w = os.pipe()
    dest = tmp_path / "template.log"
    copier = OutputCopier(r, dest)
    try:
        await _turn()
        os.write(w, b"said just before the end\n")  # no turn of the loop between this and close(): only the drain
        copier.close()
        assert dest.read_bytes() == b"said just before the end\n"
        assert copier.ended.done() and _closed(r)
    finally:
        os.close(w)


@pytest.mark.asyncio
async def test_the_drain_ends_while_the_app_goes_on_writing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """close() runs on the loop: an app (or a child that kept the pipe) writing as fast as the drain reads must not
    hold every service there. Each chunk the drain reads is answered with another 64 KiB."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    dest = tmp_path / "template.log"
    refilled = [0]
    original = OutputCopier.data_received

    def data_received(self: OutputCopier, data: bytes) -> None:
        original(self, data)
        try:
            os.write(w, b"y" * 65536)
            refilled[0] += 1
        except BlockingIOError:
            pass

    monkeypatch.setattr(OutputCopier, "data_received", data_received)
    copier = OutputCopier(r, dest)
    try:
        os.write(w, b"x" * 65536)
        copier.close()
        assert refilled[0] > 1, "the app never wrote again: the bound was not reached"
        assert dest.stat().st_size <= template.DRAIN_LIMIT + template.CHUNK
    finally:
        os.close(w)


async def _turn() -> None:
    """One turn of the loop, without sleeping."""
    fut = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(fut.set_result, None)
    await fut
