"""docs/architecture.md's module map is generated from the tree (scripts/archmap.py) and this fails while the
copy there is stale; the generator itself, on a small tree of its own: counts, summaries, what goes stale."""

from __future__ import annotations

import gc
import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "archmap.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("archmap", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclass looks its module up while it is made
    spec.loader.exec_module(mod)
    return mod


archmap = load()


@pytest.fixture(scope="module")
def real_map() -> Iterator[None]:
    """The map of the real tree rendered once for the tests that render it (it parses every module), as the
    generator's own render(); trees of a test's own are rendered afresh."""
    gc.disable()  # as in sourcetree.sources(): the collector would rescan the parse's fresh nodes, doubling its time
    try:
        render, rendered = archmap.render, archmap.render()
    finally:
        gc.enable()

    def render_once(pkg: Path = archmap.PKG) -> str:
        return rendered if pkg == archmap.PKG else str(render(pkg))

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(archmap, "render", render_once)
        yield


@pytest.mark.usefixtures("real_map")
def test_the_module_map_in_architecture_md_is_current() -> None:
    if archmap.stale(archmap.DOC.read_text()):
        pytest.fail("docs/architecture.md's module map is stale (a module was added, removed, grew, shrank or had "
                    f"its docstring changed): regenerate it with {archmap.REGENERATE} and commit "
                    "docs/architecture.md", pytrace=False)


def tree(root: Path) -> Path:
    pkg = root / "activator"
    (pkg / "core").mkdir(parents=True)
    (pkg / "errors.py").write_text('"""User-facing errors."""\n\nX = 1\n')
    (pkg / "core" / "__init__.py").write_text('"""Plain logic (no I/O). More here."""\n')
    (pkg / "core" / "phases.py").write_text('"""Phases: events in, actions out.\n\nDetails."""\n' + "a = 1\n" * 10)
    return pkg


DOC = "# Title\n\nprose before\n\n<!-- archmap:begin -->\n<!-- archmap:end -->\n\nprose after\n"


def test_the_map_lists_each_module_with_its_lines_and_summary(tmp_path: Path) -> None:
    out = archmap.render(tree(tmp_path))
    assert "| errors.py | 3 | User-facing errors. |" in out
    assert "| phases.py | 13 | Phases: events in, actions out. |" in out
    assert "| __init__.py | 1 | Plain logic (no I/O). |" in out
    assert "| `activator/core/` | 14 | 2 | phases.py (13) |" in out
    assert "| all | 17 | 3 | |" in out
    # bottom floor first: the top modules, then core
    assert out.index("### `activator/*.py`") < out.index("### `activator/core/`")


def test_the_map_goes_stale_when_the_tree_changes(tmp_path: Path) -> None:
    pkg = tree(tmp_path)
    fresh = archmap.splice(DOC, archmap.render(pkg))
    assert not archmap.stale(fresh, pkg)  # the control: just written, current
    assert fresh.startswith("# Title\n\nprose before\n\n<!-- archmap:begin -->\n")
    assert fresh.endswith("<!-- archmap:end -->\n\nprose after\n")
    phases = pkg / "core" / "phases.py"
    phases.write_text(phases.read_text() + "b = 2\n")
    assert archmap.stale(fresh, pkg), "a module grew"
    fresh = archmap.splice(DOC, archmap.render(pkg))
    (pkg / "core" / "pool.py").write_text('"""Which instance."""\n')
    assert archmap.stale(fresh, pkg), "a new module"
    fresh = archmap.splice(DOC, archmap.render(pkg))
    (pkg / "errors.py").write_text('"""The errors users see."""\n\nX = 1\n')
    assert archmap.stale(fresh, pkg), "a docstring changed, not the count"


@pytest.mark.parametrize("doc", ["no markers\n", "<!-- archmap:end -->\n<!-- archmap:begin -->\n",
                                 "<!-- archmap:begin -->\n<!-- archmap:end -->\n<!-- archmap:begin -->\n"])
def test_markers_missing_repeated_or_reversed_are_refused(doc: str) -> None:
    with pytest.raises(ValueError, match="needs exactly one <!-- archmap:begin --> followed by one"):
        archmap.splice(doc, "x")


@pytest.mark.usefixtures("real_map")
def test_check_names_the_regenerate_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    stale_doc = tmp_path / "architecture.md"
    stale_doc.write_text(DOC)
    monkeypatch.setattr(archmap, "DOC", stale_doc)
    assert archmap.main(["--check"]) == 1
    assert "the module map is stale; regenerate it: `make docs`" in capsys.readouterr().err
    assert archmap.main(["--write"]) == 0
    assert archmap.main(["--check"]) == 0  # the control: --write made it current
    assert stale_doc.read_text().endswith("<!-- archmap:end -->\n\nprose after\n")


@pytest.mark.parametrize(("doc", "first"), [
    (None, "(no docstring)"),
    ("One line.", "One line."),
    ("Wrapped over\n    two lines. Then more.", "Wrapped over two lines."),
    ("Not here (a.b. c). Here.", "Not here (a.b. c)."),
    ("Code `x. y` is not an end. End.", "Code `x. y` is not an end."),
    ("`run|status`: commands.", "`run\\|status`: commands."),
    ("No period\n\nSecond paragraph.", "No period"),
    ("word " * 60, ("word " * 60)[:180].rsplit(" ", 1)[0] + " …"),
])
def test_summary_is_the_first_sentence_on_one_line(doc: str | None, first: str) -> None:
    assert archmap.summary(doc) == first
