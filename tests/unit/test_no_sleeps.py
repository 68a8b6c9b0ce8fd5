"""tests/unit waits for nothing (issue 32): no test sleeps, through the time or asyncio modules or a `sleep`
process. A timeout is tested on fakeclock.py's clock, which moves only when the test advances it; the
static check below reads every file here, so a sleep cannot come back unnoticed."""

from __future__ import annotations

import ast
from pathlib import Path

UNIT = Path(__file__).resolve().parent
#: modules whose sleep really waits, and commands that do
SLEEPERS = {"time", "asyncio"}
SLEEP_COMMANDS = {"sleep", "/bin/sleep", "/usr/bin/sleep"}


def sleeps_here(node: ast.AST) -> bool:
    if isinstance(node, ast.Attribute):  # called, or handed to an executor
        return node.attr == "sleep" and isinstance(node.value, ast.Name) and node.value.id in SLEEPERS
    if isinstance(node, ast.ImportFrom):
        return node.module in SLEEPERS and any(a.name == "sleep" for a in node.names)
    if isinstance(node, ast.List | ast.Tuple):  # an argv
        return bool(node.elts) and isinstance(node.elts[0], ast.Constant) and node.elts[0].value in SLEEP_COMMANDS
    return False


def sleeps(source: str) -> list[int]:
    """The lines of source that sleep for real: time.sleep / asyncio.sleep (called or passed on), either imported
    by name, or a `sleep` command in an argv."""
    return sorted(node.lineno for node in ast.walk(ast.parse(source)) if sleeps_here(node))  # type: ignore[attr-defined]


def test_no_unit_test_sleeps() -> None:
    files = sorted(UNIT.glob("*.py"))
    assert len(files) >= 40 and UNIT / "fakeclock.py" in files  # the check reads what is here
    found = {f.name: lines for f in files if (lines := sleeps(f.read_text()))}
    assert not found, f"real sleeps in tests/unit (use fakeclock.FakeClock, or move the test to tests/engine): {found}"


def test_each_way_to_sleep_is_found() -> None:
    """Controls: each form is caught; the fake clock's sleep, which takes no real time, is not."""
    wait = "sleep"  # spelled apart: these are the texts the check reads, not calls this file makes
    assert sleeps(f"import asyncio\nasync def f():\n    await asyncio.{wait}(0.1)\n") == [3]
    assert sleeps(f"import time\ntime.{wait}(1)\n") == [2]
    assert sleeps("import asyncio\nloop.run_in_executor(None, time.sleep, 1)\n") == [2]
    assert sleeps("from asyncio import sleep as nap\n") == [1]
    assert sleeps("subprocess.run(['sleep', '1'])\n") == [1]
    assert sleeps("async def f(self):\n    await self.clock.sleep(5)\n    await clock.sleep(5)\n") == []
