"""Golden text of the kernel path's nftables rules (activator/net/rules.py): every function over realistic inputs,
compared with tests/data/net_rules/NAME.nft. The goldens are what nft's own parser accepts
(tests/engine/test_net_rules_nft.py), so a change here is a change to what the kernel is given: read the diff.

To rewrite the goldens after a deliberate change: ACTIVATOR_REGENERATE_GOLDEN=1 .venv/bin/pytest
tests/unit/test_net_rules.py (each rewritten one is reported as skipped, so such a run never passes silently)."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

import pytest

from activator.config.model import ListenAddress
from activator.net import rules
from activator.net.attachment import Attachment
from activator.net.nft import NftError
from activator.net.rules import Backend, ServiceLimits, Table

GOLDEN = Path(__file__).resolve().parents[1] / "data" / "net_rules"
REGENERATE = os.environ.get("ACTIVATOR_REGENERATE_GOLDEN") == "1"

IP = ipaddress.IPv4Address
L = ListenAddress
#: a /24 daemon in slot 1 and a /16 daemon in slot 0xF (bridge names no test daemon uses: nft --check of these
#: tables never meets a live one)
T24 = Table(rules.table_name("avgold0"), "avgold0", ipaddress.IPv4Network("10.89.0.0/24"), 0xA0100000)
T16 = Table(rules.table_name("avgold-1"), "avgold-1", ipaddress.IPv4Network("10.90.0.0/16"), 0xA0F00000)
WEB_1 = Attachment("web-1", IP("10.89.0.2"), 2, True, T24.mark_base, T24.bridge)
WEB_2 = Attachment("web-2", IP("10.89.0.3"), 3, False, T24.mark_base, T24.bridge)
WEB_3 = Attachment("web-3", IP("10.89.0.4"), 4, True, T24.mark_base, T24.bridge)
WIDE = Attachment("dns_1", IP("10.90.1.44"), 300, False, T16.mark_base, T16.bridge)

WEB = ServiceLimits((L("127.0.0.1", 8080),), None, None)
WEB_A = ServiceLimits((L("0.0.0.0", 80), L("::", 80)), 100, 30.0)
DNS = ServiceLimits((L("10.0.0.5", 53), L("0.0.0.0", 5353)), 50, 2.5, udp_flow_timeout=30.0, udp_reply_ratio=2.5)
DNS_B = ServiceLimits((L("127.0.0.1", 53),), None, None, udp_flow_timeout=2.0)
HANDED = ServiceLimits((L("0.0.0.0", 8081), L("::", 8081)), 20, None, handoff=True)
SEVERAL = {"web-a": WEB_A, "dns": DNS, "dns.b": DNS_B}

JUMPS_WEB = rules.jumps(WEB.listen, rules.steer_chain("web"))
JUMPS_DNS = rules.jumps(DNS.listen, rules.steer_chain("dns"), ("tcp", "udp"))


def backend(att: Attachment, port: int) -> Backend:
    return Backend(att.ip, port, att.mark)


#: golden name -> the text; tests/engine/test_net_rules_nft.py composes these names into nft batches
CASES: dict[str, Callable[[], str | list[str]]] = {
    "table_24": lambda: rules.table_text(T24, ["docker_gwbridge", "br-1a2b"]),
    "table_16": lambda: rules.table_text(T16, []),
    "plug_egress": lambda: rules.plug_rules(T24, WEB_1),
    "plug_noegress": lambda: rules.plug_rules(T24, WEB_2),
    "plug_wide": lambda: rules.plug_rules(T16, WIDE),
    "unplug_egress": lambda: rules.unplug_rules(T24, WEB_1),
    "unplug_noegress": lambda: rules.unplug_rules(T24, WEB_2),
    "acct_none": lambda: rules.acct_rules(T24, []),
    "acct_two": lambda: rules.acct_rules(T24, [WEB_1, WEB_2]),
    "acct_wide": lambda: rules.acct_rules(T16, [WIDE]),
    "counters_24": lambda: [r for s in ("web", "web-a", "dns", "dns.b") for r in rules.counter_rules(T24, s)],
    "counters_16": lambda: rules.counter_rules(T16, "dns"),
    "limits_none": lambda: rules.limit_rules(T24, {}),
    "limits_tcp_one": lambda: rules.limit_rules(T24, {"web": WEB}),
    "limits_several": lambda: rules.limit_rules(T24, SEVERAL),
    "limits_handoff": lambda: rules.limit_rules(T24, {"web": WEB, "web-a": HANDED}),
    "amplify_udp": lambda: rules.amplify_rules(T16, {"dns": DNS}),
    "steer_chain_tcp": lambda: rules.steer_chain_rules(T24, "web", JUMPS_WEB),
    "steer_chain_tcp_udp": lambda: rules.steer_chain_rules(T24, "dns", JUMPS_DNS),
    "steer_none": lambda: rules.steer_rules(T24, "web", []),
    "steer_one": lambda: rules.steer_rules(T24, "web", [backend(WEB_1, 8080)]),
    "steer_several_exempt": lambda: rules.steer_rules(
        T24, "dns", [backend(WEB_1, 53), backend(WEB_2, 53), backend(WEB_3, 5353)], ("10.0.0.0/8", "192.168.1.0/24")),
    "forget_dns_kept_counters": lambda: rules.forget_rules(
        T24, "dns", steered={"web": JUMPS_WEB}, limits={"web-a": WEB_A, "dns.b": DNS_B}, udp=True, chain=True,
        counters=False),
    "forget_web_gone": lambda: rules.forget_rules(
        T24, "web", steered={"dns": JUMPS_DNS}, limits=SEVERAL, udp=False, chain=True, counters=True),
}


def render(text: str | list[str]) -> str:
    return (text if isinstance(text, str) else "\n".join(text)) + "\n"


@pytest.mark.parametrize("name", sorted(CASES))
def test_rule_text_is_the_golden_text(name: str) -> None:
    path = GOLDEN / f"{name}.nft"
    text = render(CASES[name]())
    if REGENERATE:
        path.write_text(text)
        pytest.skip(f"regenerated {path.name}")
    assert path.exists(), f"no golden {path}: run with ACTIVATOR_REGENERATE_GOLDEN=1 once, then read it"
    assert text == path.read_text(), f"{name}: the rule text changed; diff it against {path}"


def test_every_golden_file_has_a_case() -> None:
    """A golden nobody compares would still be fed to nft by the engine check, and go stale unseen."""
    assert {p.stem for p in GOLDEN.glob("*.nft")} == set(CASES)


# --- properties the goldens show once, checked over more inputs -------------------------------------------------


def test_ipv6_listen_addresses_get_no_kernel_rule() -> None:
    assert rules.jumps([L("::1", 80), L("::", 81)], "svc_x", ("tcp", "udp")) == []
    assert rules.jumps([L("0.0.0.0", 80)], "svc_x") == ["fib daddr type local tcp dport 80 jump svc_x"]
    only_v6 = rules.limit_rules(T24, {"v6": ServiceLimits((L("::", 80),), 5, None, udp_flow_timeout=1.0)})
    # its amplification ladder exists, but nothing jumps to it, limits it or sets its timeouts
    chains = {r.split()[4] for r in only_v6 if r.startswith("add rule")}
    assert chains == {"amplify_fwd", "amplify_in", "amp_v6"}


def test_without_a_backend_a_service_chain_is_only_flushed_even_with_probers() -> None:
    assert rules.steer_rules(T24, "web", [], ("10.0.0.0/8",)) == [f"flush chain ip {T24.name} svc_web"]


def test_round_robin_is_over_the_backends_in_order() -> None:
    text = "\n".join(rules.steer_rules(T24, "web", [backend(WEB_2, 1), backend(WEB_1, 2)]))
    assert "numgen inc mod 2 map { 0 : 0xa0100003, 1 : 0xa0100002 }" in text
    assert "dnat ip to ct mark map { 0xa0100003 : 10.89.0.3 . 1, 0xa0100002 : 10.89.0.2 . 2 }" in text


def test_timeouts_round_up_to_whole_seconds_and_never_reach_zero() -> None:
    text = "\n".join(rules.limit_rules(T24, {"a": ServiceLimits((L("127.0.0.1", 1),), None, 0.2,
                                                                udp_flow_timeout=0.1)}))
    assert "established: 1 }" in text and "timeouts_1" in text
    assert "policy = { unreplied: 1, replied: 1 }" in text


def test_the_amplification_ladder_bounds_replies_by_the_ratio() -> None:
    ladder = [r for r in rules.amplify_rules(T24, {"d": ServiceLimits((L("0.0.0.0", 53),), None, None, 1.0, 4.0)})
              if " drop" in r]
    assert len(ladder) == len(rules.AMPLIFY_STEPS) - 1
    assert ladder[0].endswith("ct original bytes < 32 ct reply bytes > 112 counter name amplified_d drop")


def test_a_hostile_bridge_name_never_reaches_the_table_text() -> None:
    bad = Table("activator_x", 'x" accept; "', T24.subnet, T24.mark_base)
    with pytest.raises(NftError, match="interface name"):
        rules.table_text(bad, [])
    with pytest.raises(NftError, match="interface name"):
        rules.table_text(T24, ["br-ok", 'y"\nflush ruleset'])


@pytest.mark.parametrize("service", ["web", "web-a", "web_a", "a.b", "a b;c}", "x\ny"])
def test_a_service_name_is_an_identifier_in_every_rule(service: str) -> None:
    name = rules.ident(service)
    assert name.replace("_", "").isalnum()
    text = "\n".join([*rules.counter_rules(T24, service), *rules.steer_rules(T24, service, [backend(WEB_1, 1)]),
                      *rules.limit_rules(T24, {service: DNS}),
                      *rules.forget_rules(T24, service, steered={}, limits={}, udp=True, chain=True,
                                          counters=True)])
    assert all(line.startswith(("add ", "flush ", "delete ")) for line in text.splitlines())
    assert service == name or service not in text
