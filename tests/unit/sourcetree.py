"""activator/'s modules parsed once per run, for the tests that read the tree rather than run it (the floors'
import graph, the README's quoted messages): parsing all of it costs more than all their checks."""

from __future__ import annotations

import ast
import functools
import gc
from pathlib import Path

PKG = Path(__file__).resolve().parents[2] / "activator"


@functools.cache
def parsed() -> dict[Path, ast.Module]:
    """Every module under activator/ -> its syntax tree. The tree does not change under the tests; callers do not
    change what they are given."""
    # The cycle collector, run every few hundred allocations, would scan every node made so far again and again:
    # without it the parse takes half the time, and a tree holds no cycles for it to find.
    gc.disable()
    try:
        return {path: ast.parse(path.read_text(), str(path)) for path in sorted(PKG.rglob("*.py"))}
    finally:
        gc.enable()
