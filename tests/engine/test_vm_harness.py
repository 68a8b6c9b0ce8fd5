"""The cgroup v2 VM harness itself (scripts/vm/): `make test-cgroup2` must not pass on what proves nothing, and a
hung guest must end at its timeout. Boots the real VM (QEMU TCG, cached build) twice, ~90 s each."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
V2_ONLY = "tests/engine/test_cgroup2_host.py"


@pytest.fixture(autouse=True)
def _qemu() -> None:
    if os.environ.get("ACTIVATOR_VM"):
        pytest.skip("inside the VM already")
    if shutil.which("qemu-system-x86_64") is None:
        if os.environ.get("CI"):
            pytest.fail("qemu-system-x86_64 is missing: scripts/setup.sh --tests")
        pytest.skip("needs qemu-system-x86_64: scripts/setup.sh --tests")


def run_selection(tmp_path: Path, selection: str) -> subprocess.CompletedProcess[str]:
    sel = tmp_path / "selection.txt"
    sel.write_text(selection)
    # Booted as a v1 hybrid, where the v2-only test skips: the skip is what is played here.
    env = os.environ | {"CGROUP": "v1", "CGROUP_TESTS": str(sel)}
    return subprocess.run(["bash", str(ROOT / "scripts" / "vm" / "test-cgroup2")], env=env, capture_output=True,
                          text=True, timeout=1800)


def test_a_skipped_test_fails_the_target_unless_listed(tmp_path: Path) -> None:
    skipped = run_selection(tmp_path, f"{V2_ONLY}\n")
    assert "1 skipped" in skipped.stdout, skipped.stdout[-3000:] + skipped.stderr[-2000:]  # pytest itself passed
    assert skipped.returncode == 1
    assert f"{V2_ONLY}::test_the_installed_unit_keeps_its_instances_in_its_cgroup_on_v2 was skipped in the VM" \
        in skipped.stdout
    # The positive control: the same skip, listed with its reason, passes.
    listed = run_selection(tmp_path, f"{V2_ONLY}\nskip-ok {V2_ONLY}  a v1 boot: the v2-only test skips\n")
    assert listed.returncode == 0, listed.stdout[-3000:] + listed.stderr[-2000:]
    assert "1 skipped" in listed.stdout and "was skipped in the VM" not in listed.stdout


def vm(timeout: int, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", str(ROOT / "scripts" / "vm" / "run"), "--cgroup", "v2", "--timeout", str(timeout),
                           "--", *cmd], capture_output=True, text=True, timeout=timeout + 600)


def test_a_guest_that_does_not_end_is_killed_at_the_timeout() -> None:
    hung = vm(20, "sleep", "600")
    assert hung.returncode == 124, hung.stderr[-2000:]
    assert "did not power off within 20 s (--timeout): killed" in hung.stderr
    # The positive control: a command that ends brings its own status and output back.
    ended = vm(900, "sh", "-c", "echo from the guest; exit 7")
    assert ended.returncode == 7, ended.stderr[-2000:]
    assert "from the guest" in ended.stdout
