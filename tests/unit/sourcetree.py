"""activator/'s modules read once per run, for the tests that read the tree rather than run it (the floors'
import graph, the README's quoted messages): parsing all of it costs more than all their checks. What is kept is
what they read (each module's import statements and string literals), not the syntax trees: ~150,000 nodes held
for the rest of the run would make every later garbage collection slower."""

from __future__ import annotations

import ast
import functools
import gc
from dataclasses import dataclass
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "activator"


@dataclass(frozen=True)
class Source:
    imports: tuple[ast.Import | ast.ImportFrom, ...]
    #: every string constant, as ast has it: adjacent literals joined, an f-string's literal pieces each apart
    strings: tuple[str, ...]


@functools.cache
def sources() -> dict[Path, Source]:
    """Every module under activator/ -> what it imports and its strings. The tree does not change under the tests."""
    # The cycle collector, run every few hundred allocations, would scan every node made so far again and again:
    # without it parsing takes half the time, and a syntax tree holds no cycles for it to find.
    gc.disable()
    try:
        out = {}
        for path in sorted(PKG.rglob("*.py")):
            nodes = list(ast.walk(ast.parse(path.read_text(), str(path))))
            out[path] = Source(
                imports=tuple(n for n in nodes if isinstance(n, ast.Import | ast.ImportFrom)),
                strings=tuple(n.value for n in nodes if isinstance(n, ast.Constant) and isinstance(n.value, str)))
        return out
    finally:
        gc.enable()
