"""The README tells the truth (issue 31 item 8): its figures are docs/benchmarks.md's, its troubleshooting lines are
what activator prints, its commands are the CLI's, its links lead somewhere, and it stays short.

Troubleshooting lines that need no engine (the file's own problems) are produced here by `activator validate
--file-only` and compared whole; those that need the host (root, an image, a port in use...) are checked here by
their fixed parts against the source's string literals, and whole against the real engine in
tests/engine/test_readme_troubleshooting.py."""

from __future__ import annotations

import functools
import json
import re
import subprocess
import sys
from collections.abc import Iterable
from pathlib import Path

import pytest

from activator import __doc__ as package_doc
from activator.cli import CHECKPOINT_VERBS, build_parser

from .sourcetree import sources

ROOT = Path(__file__).parents[2]
README = ROOT / "README.md"
DOCS = ROOT / "docs"
#: where the quoted troubleshooting lines say the services file is (a newcomer's directory, as in the quickstart)
SHOWN_DIR = "/root/mysite"
#: pages other work is still writing, which README and docs/index.md may already link to (none now)
PENDING_PAGES: set[str] = set()
DASH = "\u2013"  # a range's en dash, as benchmarks.md writes 359-481
SEP = "\u203a"  # the angle quote between a reference's table, row and column
NUMBER = rf"\d(?:[\d,.]*\d)?(?:{DASH}\d(?:[\d,.]*\d)?)?"


# --- figures --------------------------------------------------------------------------------------------------------

def split_sections(md: str) -> list[tuple[str, str]]:
    """(heading title, body up to the next heading of any level), outside fenced code."""
    out: list[tuple[str, str]] = []
    title, fenced = "", False
    body: list[str] = []
    for line in md.splitlines():
        if line.startswith("```"):
            fenced = not fenced
        if not fenced and re.match(r"#{1,6} ", line):
            out.append((title, "\n".join(body)))
            title, body = line.lstrip("#").strip(), []
        else:
            body.append(line)
    out.append((title, "\n".join(body)))
    return out


def tables(body: str) -> list[list[list[str]]]:
    """Each markdown table of body: its rows (header first, the --- row left out), cells stripped of ** marks."""
    found: list[list[list[str]]] = []
    rows: list[list[str]] = []
    for line in [*body.splitlines(), ""]:
        if line.startswith("|"):
            cells = [c.strip().replace("**", "") for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]]
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                rows.append(cells)
        elif rows:
            found.append(rows)
            rows = []
    return found


LEADING = re.compile(rf"[+]?({NUMBER})")


def leading_number(text: str) -> str | None:
    m = LEADING.match(text.strip())
    return m.group(1) if m else None


def bench_cell(bench: str, ref: str) -> str:
    """The cell `TABLE [N] SEP ROW SEP COLUMN` names: the Nth table (1 by default) under the heading that starts
    with TABLE, the row whose first cells joined with ', ' are ROW, the first column headed COLUMN."""
    table_ref, row_label, column = (p.strip() for p in ref.split(SEP))
    m = re.fullmatch(r"(.*?)(?: \[(\d+)\])?", table_ref)
    assert m is not None
    title, n = m.group(1), int(m.group(2) or 1)
    bodies = [body for t, body in split_sections(bench) if t.startswith(title)]
    assert len(bodies) == 1, f"{ref}: {len(bodies)} headings of docs/benchmarks.md start with {title!r}"
    found = tables(bodies[0])
    assert len(found) >= n, f"{ref}: the section has {len(found)} table(s)"
    header, *rows = found[n - 1]
    assert column in header, f"{ref}: no column {column!r} in {header}"
    matches = [r for r in rows if any(", ".join(r[:k]) == row_label for k in range(1, len(r) + 1))]
    assert len(matches) == 1, f"{ref}: {len(matches)} rows are {row_label!r}"
    return matches[0][header.index(column)]


def measured(readme: str) -> list[tuple[str, str, str]]:
    """The README's Measured table: (what, figure, reference)."""
    body = dict(split_sections(readme))["Measured"]
    (table,) = tables(body)
    return [(r[0], r[1], r[2]) for r in table[1:]]


def figure_problems(readme: str, bench: str) -> list[str]:
    problems = []
    rows = measured(readme)
    for what, figure, ref in rows:
        try:
            cell = bench_cell(bench, ref)
        except AssertionError as e:
            problems.append(str(e))
            continue
        if leading_number(figure) != leading_number(cell):
            problems.append(f"{what}: README says {figure}, docs/benchmarks.md says {cell!r} ({ref})")
    # Prose may quote only what the table holds (so each figure has its one source).
    known = {re.sub(r"\s+", " ", f.lstrip("+")) for _, f, _ in rows}
    prose = re.sub(r"^```.*?^```", "", readme, flags=re.S | re.M)
    prose = re.sub(r"`[^`\n]*`", "", prose)
    prose = prose.replace(dict(split_sections(readme))["Measured"], "")
    for m in re.finditer(rf"(?<![\w.+])[+]?{NUMBER}\s?(?:ms|µs|MiB|GiB|x)(?!\w)", prose):
        if re.sub(r"\s+", " ", m.group().lstrip("+")) not in known:
            problems.append(f"README prose quotes {m.group()!r}, which the Measured table does not hold")
    return problems


def test_every_readme_figure_is_the_benchmarks_tables() -> None:
    readme, bench = README.read_text(), (DOCS / "benchmarks.md").read_text()
    assert len(measured(readme)) >= 10  # the check has something to check
    assert figure_problems(readme, bench) == []


def test_a_figure_that_drifted_is_caught() -> None:
    """Controls: the check fails when benchmarks.md's cell changes, when a reference names nothing, and when prose
    quotes a figure the table does not hold."""
    readme, bench = README.read_text(), (DOCS / "benchmarks.md").read_text()
    assert "| tomcat | activator (restore) | 67 |" in bench
    moved = bench.replace("| tomcat | activator (restore) | 67 |", "| tomcat | activator (restore) | 70 |")
    assert any("README says 67 ms" in p for p in figure_problems(readme, moved))
    renamed = bench.replace("## Standby", "## Frozen instances")
    assert any("start with 'Standby'" in p for p in figure_problems(readme, renamed))
    assert "below its\n49 ms" in readme or "below its 49 ms" in readme
    extra = readme.replace("below its", "below its 48 ms and", 1)
    assert any("'48 ms'" in p for p in figure_problems(extra, bench))


# --- troubleshooting --------------------------------------------------------------------------------------------------

def quoted_lines() -> list[tuple[str, str]]:
    """(page, line) for every ```text block of the README's Troubleshooting and of docs/troubleshooting.md."""
    out = []
    readme = dict(split_sections(README.read_text()))["Troubleshooting"]
    for page, text in (("README.md", readme), ("docs/troubleshooting.md", (DOCS / "troubleshooting.md").read_text())):
        for block in re.findall(r"^```text\n(.*?)^```", text, flags=re.S | re.M):
            out += [(page, line) for line in block.splitlines() if line]
    return out


S = "services:\n  mysite:\n    image: mysite:1\n    listen: {listen}\n    port: 8000\n"
#: a line's distinctive part -> the file that makes `activator validate --file-only` print it (name, text)
FILE_CASES: dict[str, tuple[str, str]] = {
    "a tab character": ("mysite.yaml", "services:\n  mysite:\n\timage: mysite:1\n"),
    "did you mean 'idle_timeout'": ("mysite.yaml", S.format(listen="127.0.0.1:8000") + "    idle_timout: 10m\n"),
    "names no host": ("mysite.yaml", S.format(listen="8000")),
    "collides with 127.0.0.1:8000 of this service": (
        "mysite.yaml", S.format(listen="[127.0.0.1:8000, 0.0.0.0:8000]")),
    "is already used by service 'mysite'": (
        "mysite.yaml", S.format(listen="127.0.0.1:8000") + S.format(listen="127.0.0.1:8000").split("\n", 1)[1]
        .replace("mysite:\n", "other:\n", 1)),
    "a standby's app would accept": (
        "mysite.yaml", S.format(listen="127.0.0.1:8000") + "    handoff: true\n    standby: 1\n"),
    "no published port": ("docker-compose.yml", "services:\n  cache:\n    image: activator-demo/redis:latest\n"
                                               "    x-activator: {}\n"),
}
#: a line's distinctive part -> its template ({} where the source puts a value); each clause of 12 characters or
#: more is inside one of the source's string literals, so a reworded message fails here
HOST_CASES: dict[str, str] = {
    "must run as root": "activator: error: activator must run as root: runc, CRIU, overlay mounts and network "
                        "namespaces need it (try sudo)",
    "is not in the local": "activator: error: {}: image '{}' is not in the local {} engine; "
                           "build or pull it ({} pull {}, or make images for the demo images)",
    "is not in the image's /etc/passwd": "activator: error: {}: user '{}' is not in the image's "
                                         "/etc/passwd; name a user the image has, or a number",
    "is already in use by another process": "activator: error: {}: {} is already in use by "
                                            "another process; stop it or pick another port",
    "the app listens on port": "activator: {} NOT serving on {}: no checkpoint (service '{}': the app listens on "
                               "port {}, not on port {}; set 'port: {}' (or make the app listen on {}))",
    "reloads only its own file": "activator: error: reload refused: the running activator reloads only its own "
                                 "file {}, not {}; edit {}, or restart activator with -c {}",
    "CRIU not found": "activator: error: {}: CRIU not found {}; run 'make setup' (as root) to "
                      "install it",
    "cannot reach the Podman engine": "activator: error: {}: cannot reach the {} engine {} ({}); "
                                      "start its API: `systemctl enable --now podman.socket`, or `podman system "
                                      "service --time=0 unix://{}`, or change settings.images",
}


def case_of(line: str, cases: Iterable[str]) -> str | None:
    keys = [k for k in cases if k in line]
    assert len(keys) <= 1, f"{line!r} matches cases {keys}"
    return keys[0] if keys else None


def test_every_quoted_line_has_a_case() -> None:
    lines = quoted_lines()
    assert len([1 for page, _ in lines if page == "README.md"]) >= 10  # the ten errors people hit
    for page, line in lines:
        assert case_of(line, FILE_CASES) or case_of(line, HOST_CASES), f"{page}: no test case for {line!r}"


#: One interpreter validates every case's file, each as `activator validate --file-only FILE` would (cli.main,
#: logging set up afresh): one process start instead of one per quoted line.
VALIDATE_EACH = """
import contextlib, io, json, logging, sys
from activator import cli
printed = {}
for path in sys.argv[1:]:
    out = io.StringIO()
    logging.root.handlers.clear()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(out):
        cli.main(["validate", "--file-only", path])
    printed[path] = out.getvalue()
print(json.dumps(printed))
"""


@pytest.fixture(scope="module")
def validated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """FILE_CASES key -> the lines `activator validate --file-only` printed for its file, in SHOWN_DIR."""
    paths = {}
    for i, (key, (name, text)) in enumerate(FILE_CASES.items()):
        case_dir = tmp_path_factory.mktemp(f"case{i}")
        (case_dir / name).write_text(text)
        paths[key] = case_dir / name
    out = subprocess.run([sys.executable, "-c", VALIDATE_EACH, *map(str, paths.values())], capture_output=True,
                         text=True, timeout=60, cwd=tmp_path_factory.getbasetemp())
    assert out.returncode == 0, out.stderr
    printed: dict[str, str] = json.loads(out.stdout)
    return {key: printed[str(path)].replace(str(path.parent), SHOWN_DIR).splitlines() for key, path in paths.items()}


@pytest.mark.parametrize(("page", "line"), [pl for pl in quoted_lines() if case_of(pl[1], FILE_CASES)])
def test_a_file_problem_is_printed_as_quoted(validated: dict[str, list[str]], page: str, line: str) -> None:
    key = case_of(line, FILE_CASES)
    assert key is not None
    printed = validated[key]
    assert line in printed, f"{page} quotes {line!r}; activator printed {printed}"


def test_each_case_is_validated_in_its_own_directory(validated: dict[str, list[str]]) -> None:
    """Control: the cases' files share names, so each must be shown from its own directory (and every case is
    printed something: a case whose line nobody quotes still runs)."""
    assert set(validated) == set(FILE_CASES)
    assert all(any(SHOWN_DIR in line for line in lines) for lines in validated.values()), validated


@functools.cache
def source_literals() -> list[str]:
    """Every string literal of activator/ (adjacent ones joined, as Python joins them); an f-string's literal
    pieces each on their own. Read once per run: the tree does not change under the tests."""
    return [s for source in sources().values() for s in source.strings]


@pytest.mark.parametrize(("page", "line"), [pl for pl in quoted_lines() if case_of(pl[1], HOST_CASES)])
def test_a_host_problem_is_what_the_source_says(page: str, line: str) -> None:
    key = case_of(line, HOST_CASES)
    assert key is not None
    template = HOST_CASES[key]
    pattern = "".join(".+?" if p == "{}" else re.escape(p) for p in re.split(r"(\{\})", template))
    assert re.fullmatch(pattern, line), f"{page} quotes {line!r}, not the shape {template!r}"
    literals = source_literals()
    # The line is composed (validate puts the file and key in front, a caller its own clause): each clause apart.
    pieces = [p.strip() for p in re.split(r"\{\}|; |: | \(|, or ", template.removeprefix("activator: error: "))]
    pieces = [p for p in pieces if len(p) >= 12]
    assert pieces
    for piece in pieces:
        assert any(piece in lit for lit in literals), f"{piece!r} ({page}) is no longer in activator's source"


def test_a_reworded_message_is_caught() -> None:
    """Control: a piece that is not in the source is found missing (the check above can fail)."""
    literals = source_literals()
    assert any("is already in use by another process; stop it or pick another port" in lit for lit in literals)
    assert not any("is already taken by another process; stop it or pick another port" in lit for lit in literals)


# --- commands, links, size ----------------------------------------------------------------------------------------

def cli_commands() -> set[str]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction"]
    return set(getattr(sub, "choices", None) or ())


def test_readme_help_and_docs_name_the_same_commands() -> None:
    commands = cli_commands()
    assert len(commands) >= 14
    readme_cmds = set(re.findall(r"^\| `activator (\w+)", README.read_text(), re.M))
    readme_cmds |= set(re.findall(r"^\| `activator \w+[^|]*?` / `activator (\w+)", README.read_text(), re.M))
    assert readme_cmds == commands
    docs_cmds = set(re.findall(r"`activator (\w+)", (DOCS / "commands.md").read_text()))
    assert commands <= docs_cmds
    top_help = build_parser().format_help()
    listed = re.search(r"Command line: `activator ([\w|\s]+)`", top_help)
    assert listed is not None and set(re.sub(r"\s", "", listed.group(1)).split("|")) == commands
    assert f"activator {'|'.join(CHECKPOINT_VERBS)}" not in README.read_text()  # the verbs are checkpoint's:
    assert f"`activator checkpoint {'|'.join(CHECKPOINT_VERBS).replace('|', chr(92) + '|')}`" in README.read_text()
    cli_line = re.search(r"cli\s+`activator ([\w|]+)`", package_doc or "")
    assert cli_line is not None and set(cli_line.group(1).split("|")) == commands


def test_every_relative_link_leads_to_a_file() -> None:
    pages = [README, ROOT / "CHANGELOG.md", *DOCS.glob("*.md")]
    for page in pages:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", page.read_text()):
            if re.match(r"[a-z]+:", target):
                continue  # a web address
            path = (page.parent / target).resolve()
            assert path.exists() or path.name in PENDING_PAGES, f"{page.name} links to {target}: no such file"


def test_the_readme_fits_a_newcomer() -> None:
    text = README.read_text()
    assert len(text.splitlines()) <= 300
    first_screen = "\n".join(text.splitlines()[:12])
    assert "for one Linux host" in first_screen  # what it is and for whom, before anything else
    for heading in ("Requirements", "Quickstart", "Quickstart with your own image", "Troubleshooting",
                    "Compared with Sablier, zeropod, Knative, systemd socket activation", "Contents"):
        assert f"\n## {heading}\n" in text
