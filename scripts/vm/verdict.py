"""The verdict of `make test-cgroup2` on the JUnit report the VM wrote (scripts/vm/test-cgroup2).

pytest's own status already fails on a failure or an error; this adds what it passes: a test skipped there, which
proves nothing, unless scripts/vm/cgroup-tests.txt lists it as `skip-ok NODEID reason`. The report comes from the
guest, so it is read as data: one that does not parse or names no test is a failure, never a pass.
    python3 scripts/vm/verdict.py REPORT SELECTION     exit 0 (fine) or 1, one line per problem
"""

from __future__ import annotations

import re
import sys
import xml.etree.ElementTree as ET
from pathlib import Path


def allowed_skips(selection: str) -> dict[str, str]:
    found = {}
    for line in selection.splitlines():
        m = re.match(r"\s*skip-ok\s+(\S+)\s*(.*)", line)
        if m:
            found[m.group(1)] = m.group(2)
    return found


def problems(report: bytes, selection: str) -> list[str]:
    allowed = allowed_skips(selection)
    try:
        root = ET.fromstring(report)
    except ET.ParseError as e:
        return [f"the VM's test report does not parse ({e})"]
    out, ran = [], 0
    for case in root.iter("testcase"):
        ran += 1
        skip = case.find("skipped")
        if skip is None:
            continue
        node = f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name', '')}"
        if not any(node == a or node.startswith((a + "::", a + "[")) for a in allowed):
            out.append(f"{node} was skipped in the VM ({skip.get('message', '')}): fix it, or list it as "
                       "skip-ok in scripts/vm/cgroup-tests.txt with the reason")
    if ran == 0:
        out.append("the VM's test report names no test")
    return out


def main_args(argv: list[str]) -> int:
    report, selection = Path(argv[0]), Path(argv[1])
    if report.is_symlink():  # debugfs copies a guest's link as a link: never read a host file through it
        print(f"test-cgroup2: the VM's test report {report} is a symbolic link: not read")
        return 1
    try:
        data = report.read_bytes()
    except OSError as e:
        print(f"test-cgroup2: no test report came back from the VM ({e.strerror}); see the output above")
        return 1
    found = problems(data, selection.read_text())
    for p in found:
        print(f"test-cgroup2: {p}")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main_args(sys.argv[1:]))
