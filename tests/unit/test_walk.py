"""docs/architecture.md's walk of a first connection names real code: every `module.function` in that section
resolves (importlib, then getattr), every hop names something callable, and the hop count in its title is the
number of hops. A renamed or removed function fails here, so the walk cannot rot unnoticed."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

DOC = Path(__file__).resolve().parents[2] / "docs" / "architecture.md"
TITLE = re.compile(r"^## A first connection, from accept to first byte \((\d+) hops\)$", re.M)
HOP = re.compile(r"^(\d+)\. `([\w.]+)`", re.M)
#: a dotted name under activator, as the walk writes them (the package first, no `activator.`)
NAME = re.compile(r"`((?:config|core|net|runtime|checkpoints|daemon|cli|errors|tasks|statedir)(?:\.\w+)+)`")


def section(doc: str) -> tuple[int, str]:
    """The walk's stated hop count and its text (to the next section)."""
    m = TITLE.search(doc)
    assert m is not None, "docs/architecture.md has no '## A first connection, from accept to first byte (N hops)'"
    rest = doc[m.end():]
    return int(m.group(1)), rest.split("\n## ", 1)[0]


def resolve(name: str) -> object | None:
    """What activator.NAME is: the longest importable module prefix, then attributes. None if nothing is."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj: object = importlib.import_module("activator." + ".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for attr in parts[cut:]:
            if not hasattr(obj, attr):
                return None
            obj = getattr(obj, attr)
        return obj
    return None


def test_the_walk_counts_its_hops() -> None:
    stated, text = section(DOC.read_text())
    numbers = [int(n) for n, _ in HOP.findall(text)]
    assert numbers == list(range(1, len(numbers) + 1)), f"hops not numbered 1..N: {numbers}"
    assert stated == len(numbers), f"the title says {stated} hops, the walk lists {len(numbers)}"


def test_every_name_in_the_walk_is_in_the_code() -> None:
    _, text = section(DOC.read_text())
    names = set(NAME.findall(text))
    assert len(names) > 20  # the control: the pattern finds the walk's names
    missing = sorted(n for n in names if resolve(n) is None)
    if missing:
        pytest.fail("docs/architecture.md's first-connection walk names code that is not there (renamed or "
                    "moved? fix the walk):\n" + "\n".join(missing), pytrace=False)
    not_called = sorted(n for _, n in HOP.findall(text) if not callable(resolve(n)))
    assert not not_called, f"a hop must be a function or method: {not_called}"


def test_a_name_the_code_does_not_have_is_caught() -> None:
    assert resolve("daemon.proxy.Connection._splice") is not None  # the control
    assert resolve("runtime.sandboxprep.prepare") is not None
    assert resolve("daemon.proxy.Connection.no_such_hop") is None
    assert resolve("daemon.no_such_module.anything") is None
    assert resolve("runtime.sandbox.Sandbox._prepare_blocking") is None  # moved to runtime.sandboxprep.prepare
    _, text = section("## A first connection, from accept to first byte (2 hops)\n\n1. `daemon.proxy.gone`\n"
                      "2. `core.phases.ConnectionPhases.admitted`\n\n## Next\n\n3. `not.this`\n")
    assert HOP.findall(text) == [("1", "daemon.proxy.gone"), ("2", "core.phases.ConnectionPhases.admitted")]
    assert [n for n in NAME.findall(text) if resolve(n) is None] == ["daemon.proxy.gone"]
