"""One version, said the same everywhere: pyproject.toml (what pip installs), activator.__version__ (what
`activator --version`, build_info and exported checkpoints say) and CHANGELOG.md's newest section."""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

from activator import __version__

ROOT = Path(__file__).parents[2]


def test_pyproject_and_package_agree() -> None:
    with (ROOT / "pyproject.toml").open("rb") as f:
        assert tomllib.load(f)["project"]["version"] == __version__


def test_the_changelog_names_this_version_first() -> None:
    sections = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), re.M)
    assert sections and sections[0] == __version__
    assert len(sections) == len(set(sections))  # each version once: a copied section is caught


def test_activator_version_prints_it() -> None:
    out = subprocess.run([sys.executable, "-m", "activator", "--version"], capture_output=True, text=True,
                         check=True, timeout=60)
    assert out.stdout.strip() == f"activator {__version__}"
