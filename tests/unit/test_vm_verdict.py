"""scripts/vm/verdict.py: `make test-cgroup2` fails on a test the VM skipped unless the selection allows it, and on a
report that does not parse or names no test (the report comes from the guest)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "vm" / "verdict.py"


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("vm_verdict", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


verdict = load()


def report(*cases: str) -> bytes:
    return ('<?xml version="1.0" encoding="utf-8"?><testsuites><testsuite name="pytest">'
            + "".join(cases) + "</testsuite></testsuites>").encode()


def case(module: str, name: str, skipped: str | None = None) -> str:
    body = f'<skipped type="pytest.skip" message="{skipped}">why</skipped>' if skipped else ""
    return f'<testcase classname="{module}" name="{name}" time="1.0">{body}</testcase>'


SELECTION = """# comment
tests/engine/test_standby.py
skip-ok tests/engine/test_handoff.py::test_b  handoff needs the lead's v2 work
skip-ok tests/engine/test_sandbox.py  whole file
"""


def test_a_skip_not_listed_fails_and_is_named() -> None:
    got = verdict.problems(report(case("tests.engine.test_standby", "test_a", skipped="needs root")), SELECTION)
    assert len(got) == 1 and "tests/engine/test_standby.py::test_a was skipped in the VM (needs root)" in got[0]


def test_listed_skips_and_passes_are_fine() -> None:
    ok = report(case("tests.engine.test_standby", "test_a"),
                case("tests.engine.test_handoff", "test_b", skipped="x"),
                case("tests.engine.test_sandbox", "test_c[runc]", skipped="x"))
    assert verdict.problems(ok, SELECTION) == []


def test_a_listed_name_does_not_allow_its_prefixes_siblings() -> None:
    # skip-ok test_b must not cover test_b2 (a longer name), nor test_handoff.py's other tests
    got = verdict.problems(report(case("tests.engine.test_handoff", "test_b2", skipped="x"),
                                  case("tests.engine.test_handoff", "test_c", skipped="x")), SELECTION)
    assert len(got) == 2


def test_a_report_that_does_not_parse_or_names_no_test_fails() -> None:
    assert "does not parse" in verdict.problems(b"<testsuites><testcase", SELECTION)[0]
    assert verdict.problems(report(), SELECTION) == ["the VM's test report names no test"]


def test_the_command_line(tmp_path: Path) -> None:
    sel = tmp_path / "sel.txt"
    sel.write_text(SELECTION)
    (tmp_path / "junit.xml").write_bytes(report(case("tests.engine.test_standby", "test_a")))
    assert verdict.main_args([str(tmp_path / "junit.xml"), str(sel)]) == 0
    assert verdict.main_args([str(tmp_path / "missing.xml"), str(sel)]) == 1


def test_a_report_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    sel = tmp_path / "sel.txt"
    sel.write_text(SELECTION)
    good = tmp_path / "elsewhere.xml"  # a host file that would pass, reached through a link the guest made
    good.write_bytes(report(case("tests.engine.test_standby", "test_a")))
    (tmp_path / "junit.xml").symlink_to(good)
    assert verdict.main_args([str(tmp_path / "junit.xml"), str(sel)]) == 1
    assert verdict.main_args([str(good), str(sel)]) == 0
