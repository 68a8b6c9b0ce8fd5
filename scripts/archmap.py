"""docs/architecture.md's module map, generated from the tree so it cannot go stale.

Per package (in the order of its floors), each module with its line count and the first sentence of its
docstring, read with ast (nothing is imported: a developer's tool, never on the daemon's import path).
    python3 scripts/archmap.py            print the map
    python3 scripts/archmap.py --write    rewrite the block between the markers in docs/architecture.md
    python3 scripts/archmap.py --check    exit 1, saying how to regenerate it, when that block is stale
tests/unit/test_archmap.py runs the check; `make docs` runs --write.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "activator"
DOC = ROOT / "docs" / "architecture.md"
BEGIN = "<!-- archmap:begin -->"
END = "<!-- archmap:end -->"
REGENERATE = "`make docs` (or `.venv/bin/python scripts/archmap.py --write`)"
#: packages bottom floor first, as tests/unit/test_architecture.py stacks them; a package not named here is
#: listed after these (alphabetically), so a new one shows up rather than vanishing
FLOORS = ("", "config", "core", "net", "runtime", "checkpoints", "daemon", "cli")
#: a summary past this is cut at a word (the module's docstring has the rest)
SUMMARY_MAX = 180


@dataclass(frozen=True)
class Module:
    package: str  # "" for the modules at activator/'s top
    file: str  # its path under its package, e.g. "sandbox.py" or "__init__.py"
    lines: int
    summary: str


def summary(doc: str | None) -> str:
    """The docstring's first sentence (its first paragraph up to a period that ends a sentence outside brackets
    and backticks), on one line, safe in a Markdown table cell."""
    if not doc:
        return "(no docstring)"
    para = " ".join(doc.strip().split("\n\n")[0].split())
    depth, code, end = 0, False, len(para)
    for i, ch in enumerate(para):
        if ch == "`":
            code = not code
        elif code:
            continue
        elif ch in "([":
            depth += 1
        elif ch in ")]":
            depth = max(0, depth - 1)
        elif ch == "." and depth == 0 and (i + 1 == len(para) or para[i + 1] == " "):
            end = i + 1
            break
    text = para[:end]
    if len(text) > SUMMARY_MAX:
        text = text[:SUMMARY_MAX].rsplit(" ", 1)[0] + " …"
    return text.replace("|", "\\|")


def modules(pkg: Path = PKG) -> list[Module]:
    found = []
    for path in sorted(pkg.rglob("*.py")):
        rel = path.relative_to(pkg)
        text = path.read_text()
        found.append(Module(package="/".join(rel.parts[:-1]), file=rel.name, lines=len(text.splitlines()),
                            summary=summary(ast.get_docstring(ast.parse(text)))))
    return found


def _order(package: str) -> tuple[int, str]:
    return (FLOORS.index(package), "") if package in FLOORS else (len(FLOORS), package)


def render(pkg: Path = PKG) -> str:
    """The block between the markers (markers excluded)."""
    by_package: dict[str, list[Module]] = {}
    for m in modules(pkg):
        by_package.setdefault(m.package, []).append(m)
    packages = sorted(by_package, key=_order)
    out = [f"<!-- generated from the tree by scripts/archmap.py: do not edit; regenerate with {REGENERATE} -->",
           "", "| package | lines | modules | largest |", "|---|--:|--:|---|"]
    for p in packages:
        mods = by_package[p]
        big = max(mods, key=lambda m: m.lines)
        out.append(f"| `{_name(p)}` | {sum(m.lines for m in mods):,} | {len(mods)} | {big.file} ({big.lines:,}) |")
    total = sum(m.lines for ms in by_package.values() for m in ms)
    out.append(f"| all | {total:,} | {sum(len(ms) for ms in by_package.values())} | |")
    for p in packages:
        mods = sorted(by_package[p], key=lambda m: (m.file != "__init__.py", m.file))
        out += ["", f"### `{_name(p)}`", "", "| module | lines | what it is |", "|---|--:|---|"]
        out += [f"| {m.file} | {m.lines:,} | {m.summary} |" for m in mods]
    return "\n".join(out)


def _name(package: str) -> str:
    return f"activator/{package}/" if package else "activator/*.py"


def splice(doc: str, block: str) -> str:
    """doc with the text between its one pair of markers replaced by block. ValueError (one line) when the
    markers are missing, repeated or out of order."""
    if doc.count(BEGIN) != 1 or doc.count(END) != 1 or doc.index(BEGIN) > doc.index(END):
        raise ValueError(f"{_shown(DOC)} needs exactly one {BEGIN} followed by one {END}")
    head, rest = doc.split(BEGIN)
    _, tail = rest.split(END)
    return f"{head}{BEGIN}\n{block}\n{END}{tail}"


def _shown(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def stale(doc: str, pkg: Path = PKG) -> bool:
    return splice(doc, render(pkg)) != doc


def main(argv: list[str]) -> int:
    if argv == ["--write"]:
        doc = DOC.read_text()
        new = splice(doc, render())
        if new != doc:
            DOC.write_text(new)
        return 0
    if argv == ["--check"]:
        if stale(DOC.read_text()):
            print(f"{_shown(DOC)}: the module map is stale; regenerate it: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if not argv:
        print(render())
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except ValueError as e:
        print(f"archmap: {e}", file=sys.stderr)
        sys.exit(1)
