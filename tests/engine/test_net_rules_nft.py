"""nftables itself accepts every golden rule text (tests/data/net_rules/, checked against activator/net/rules.py by
tests/unit/test_net_rules.py), composed into the transactions HostNetwork runs in the order it runs them.
`nft --check -f` has the kernel validate the whole batch (objects, references, types) and commits nothing; the
tables are named after bridges no daemon uses."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.unit.test_net_rules import CASES, GOLDEN

pytestmark = pytest.mark.engine

#: open() and the first services and instances of a /24 daemon, as one transaction
SETUP_24 = ["table_24", "counters_24", "plug_egress", "plug_noegress", "acct_none", "acct_two", "limits_none",
            "limits_tcp_one", "limits_several", "limits_handoff", "steer_chain_tcp", "steer_chain_tcp_udp",
            "steer_none", "steer_one", "steer_several_exempt"]
BATCHES = {
    "set up /24": SETUP_24,
    "a reload forgets dns, keeping its counters": [*SETUP_24, "forget_dns_kept_counters"],
    "a reload removes web": [*SETUP_24, "forget_web_gone"],
    # unplug rebuilds the accounting chain without the instance first: its counters are in use until then
    "an instance without egress goes": [*SETUP_24, "acct_none", "unplug_noegress"],
    "set up /16, an instance past index 255, UDP": ["table_16", "counters_16", "plug_wide", "acct_wide",
                                                     "amplify_udp"],
}


def golden(name: str) -> str:
    return (GOLDEN / f"{name}.nft").read_text()


def check(text: str, tmp_path: Path) -> subprocess.CompletedProcess[str]:
    path = tmp_path / "batch.nft"
    path.write_text(text)
    return subprocess.run(["nft", "--check", "-f", str(path)], capture_output=True, text=True, timeout=60)


@pytest.fixture(autouse=True)
def _nft() -> None:
    if shutil.which("nft") is None:
        pytest.skip("needs the nft command (Debian package nftables)")


@pytest.mark.parametrize("batch", sorted(BATCHES))
def test_nft_accepts_the_golden_text(batch: str, tmp_path: Path) -> None:
    out = check("".join(golden(n) for n in BATCHES[batch]), tmp_path)
    assert out.returncode == 0, f"{batch}: {out.stderr.strip()[:2000]}"


def test_unplug_runs_its_deletions_one_by_one_because_one_may_be_refused(tmp_path: Path) -> None:
    """An instance with egress was never in noegress: that one deletion is refused by the kernel (which is why
    HostNetwork.unplug runs them one at a time); every other is accepted. Also the check's own negative control:
    it does refuse what the kernel would."""
    setup = "".join(golden(n) for n in [*SETUP_24, "acct_none"])
    lines = golden("unplug_egress").splitlines()
    refused = [line for line in lines if check(setup + line + "\n", tmp_path).returncode]
    assert refused == ["delete element ip activator_avgold0 noegress { 10.89.0.2 }"]


def test_text_nft_would_not_parse_is_refused(tmp_path: Path) -> None:
    """Negative control for the parser side: a rule with a typo in an otherwise accepted batch."""
    setup = "".join(golden(n) for n in SETUP_24)
    assert check(setup + "add rule ip activator_avgold0 acct ct mark 0x1 counter name nowhere\n",
                 tmp_path).returncode != 0
    assert check(setup + "add rule ip activator_avgold0 acct ct markk 0x1 accept\n", tmp_path).returncode != 0


def test_every_golden_is_checked() -> None:
    checked = {n for names in BATCHES.values() for n in names} | {"unplug_egress"}
    assert checked == set(CASES)
