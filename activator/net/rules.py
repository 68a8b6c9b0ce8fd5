"""The nftables rule text of instance networking, as pure functions of frozen values: no I/O, no clock, no state.

HostNetwork (network.py) decides what is installed and when, keeps what it asked for (to repair it), and runs the
text these functions return through libnftables, usually several of them in one transaction. Every name that
reaches the text is either checked (interface names: nft.ifname) or made an identifier one to one (ident), so no
service or bridge name can end a string or a rule.

The golden text of each function is in tests/data/net_rules/ (tests/unit/test_net_rules.py), and nft's own parser
accepts every golden there (tests/engine/test_net_rules_nft.py).
"""

from __future__ import annotations

import ipaddress
import itertools
import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from activator.config.model import ListenAddress

from .attachment import Attachment
from .marks import COUNTED, EGRESS, HAIRPIN, MARK_MASK, NOT_COUNTED
from .nft import ifname

#: how long a half-open kernel-path connection is kept (Linux: 120 s and 60 s); a real handshake takes a round trip
SYN_TIMEOUT = 10
#: how long a kernel-path UDP flow the app has not answered is kept (conntrack's `unreplied`; Linux: 30 s), and
#: a relayed one (daemon/udp.py): a forged source's flow is never answered, and must not hold anything for long
UNANSWERED_TIMEOUT = 5
#: the reply-bytes bound of a UDP flow (udp_reply_ratio times what its client sent) as a ladder of nftables
#: rules, since nftables compares a conntrack counter with constants only: for the client's bytes in
#: [low, next low) the replies may reach ratio x low, so the bound is between ratio/sqrt(2) and ratio times what it
#: sent. Past the top (a client that sent 4 GiB in one flow) it is not bounded.
AMPLIFY_STEPS = (28, *(int(32 * 2 ** (i / 2)) for i in range(55)))
HOOKS = ("prerouting", "output")


@dataclass(frozen=True)
class Table:
    """One daemon's two tables (ip and bridge, one name) for its bridge, its subnet and its marks."""

    name: str
    bridge: str
    subnet: ipaddress.IPv4Network
    mark_base: int

    @property
    def gateway(self) -> ipaddress.IPv4Address:
        return next(self.subnet.hosts())


@dataclass(frozen=True)
class Backend:
    ip: ipaddress.IPv4Address
    port: int
    mark: int


@dataclass(frozen=True)
class ServiceLimits:
    """What the kernel path enforces for one service, before any instance sees a connection."""

    listen: tuple[ListenAddress, ...]
    max_connections: int | None
    client_idle_timeout: float | None
    udp_flow_timeout: float | None = None  # a UDP service's (None: it takes no UDP)
    udp_reply_ratio: float = 3.0
    handoff: bool = False  # its apps accept from its own socket: new connections to it counted in input

    @property
    def udp_policy(self) -> str | None:
        return None if self.udp_flow_timeout is None else f"udp_{max(1, math.ceil(self.udp_flow_timeout))}"

    @property
    def idle_seconds(self) -> int | None:
        return None if self.client_idle_timeout is None else max(1, math.ceil(self.client_idle_timeout))

    @property
    def timeout_policy(self) -> str:
        """One ct timeout object per distinct policy (named by it, so re-adding one is a no-op)."""
        return f"timeouts_{self.idle_seconds or 'default'}"


def ident(name: str) -> str:
    """A name as an nftables identifier, one to one: web-a and web_a must never share a chain or a counter."""
    # a prefix code: every '_' of the result starts a two-character escape
    return re.sub(r"[^A-Za-z0-9]", lambda m: _ESCAPES.get(m.group(), f"_x{ord(m.group()):02x}"), name)


_ESCAPES = {"-": "_d", "_": "_u", ".": "_p"}


def table_name(bridge: str) -> str:
    return f"activator_{ident(bridge)}"


# --- the tables -------------------------------------------------------------------------------------------------


def table_text(table: Table, docker_bridges: Iterable[str]) -> str:
    """Both tables whole, empty of instances and services. NftError for an interface name that is not one."""
    br, net, t = ifname(table.bridge), table.subnet, table.name
    docker = " ".join(f'iifname {br} oifname {ifname(name)} ct status & dnat == 0 drop\n'
                      for name in sorted({"docker0", "br-*", *docker_bridges}))
    return f"""
table ip {t} {{
    comment "activator marks {table.mark_base:#x}"
    set noegress {{ type ipv4_addr; }}
    map egress_marks {{ type ipv4_addr : mark; }}
    counter guarded {{ }}
    counter outsiders {{ }}
    chain guard {{
        type filter hook prerouting priority raw; policy accept;
        iifname {br} ip daddr 127.0.0.0/8 counter name guarded drop
        iifname {br} ip saddr != {net} counter name guarded drop
    }}
    # After conntrack, before the entry is confirmed: `ct timeout set` attaches the policy to a new entry only
    chain timeouts_in {{
        type filter hook prerouting priority mangle; policy accept;
        ct state new tcp flags & (fin|syn|rst|ack) == syn jump timeouts
        ct state new meta l4proto udp jump timeouts
    }}
    chain timeouts_out {{
        type filter hook output priority mangle; policy accept;
        ct state new tcp flags & (fin|syn|rst|ack) == syn jump timeouts
        ct state new meta l4proto udp jump timeouts
    }}
    chain timeouts {{ }}
    chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
    chain output {{ type nat hook output priority -100; policy accept; }}
    chain limit_in {{ type filter hook prerouting priority mangle; policy accept; }}
    chain limit_out {{ type filter hook output priority mangle; policy accept; }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 127.0.0.0/8 oifname {br} masquerade
        ip saddr {net} oifname != {br} masquerade
        ip saddr {net} ip daddr {net} ct status dnat masquerade
    }}
    chain mark_egress {{
        type filter hook prerouting priority mangle; policy accept;
        iifname {br} ct state new ct mark set ip saddr map @egress_marks
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        oifname {br} ct status dnat meta mark set meta mark | {HAIRPIN:#x}
        {docker}
        iifname != {br} ct direction original ct original ip daddr {table.gateway} counter name outsiders drop
        iifname {br} ip saddr @noegress ct state new drop
        oifname {br} ct state new ct status dnat accept
        oifname {br} ct state new drop
        jump acct
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {br} ip saddr @noegress ct state new drop
        iifname != "lo" iifname != {br} ct direction original ip daddr {table.gateway} counter name outsiders drop
        jump handoff
        jump acct
    }}
    chain acct_out {{ type filter hook output priority filter; policy accept; jump acct; }}
    # handoff services' connections (what their apps accept): each counted once, in input (see limit_rules)
    chain handoff {{ }}
    chain acct {{ }}
}}
table bridge {t} {{
    set ports {{ type ifname; }}
    set sources {{ type ifname . ether_addr . ipv4_addr; }}
    counter spoofed {{ }}
    counter crossed {{ }}
    chain isolate {{
        type filter hook forward priority 100; policy accept;
        iifname != @ports accept
        oifname != @ports accept
        meta mark & {HAIRPIN:#x} == {HAIRPIN:#x} accept
        counter name crossed drop
    }}
    chain guard {{
        type filter hook prerouting priority filter; policy accept;
        iifname != @ports accept
        ether type ip iifname . ether saddr . ip saddr @sources accept
        ether type arp iifname . ether saddr . arp saddr ip @sources \
            iifname . arp saddr ether . arp saddr ip @sources accept
        counter name spoofed drop
    }}
}}"""


# --- instances --------------------------------------------------------------------------------------------------


def plug_rules(table: Table, att: Attachment) -> list[str]:
    """An instance's counters, its egress mark, its bridge port and the sources that port may send from."""
    t, m = table.name, att.mark
    cmds = [f"add counter ip {t} in_{m:x}", f"add counter ip {t} out_{m:x}", f"add counter ip {t} conns_{m:x}",
            f"add element ip {t} egress_marks {{ {att.ip} : {m | EGRESS:#x} }}",
            f'add element bridge {t} ports {{ "{att.veth}" }}',
            f'add element bridge {t} sources {{ "{att.veth}" . {att.mac} . {att.ip} }}']
    if not att.egress:
        cmds.append(f"add element ip {t} noegress {{ {att.ip} }}")
    return cmds


def unplug_rules(table: Table, att: Attachment) -> list[str]:
    """plug_rules undone, one command each: the caller runs them one by one, and what is already gone is fine."""
    t, m = table.name, att.mark
    return [f"delete counter ip {t} in_{m:x}", f"delete counter ip {t} out_{m:x}",
            f"delete counter ip {t} conns_{m:x}",
            f"delete element ip {t} egress_marks {{ {att.ip} }}",
            f"delete element ip {t} noegress {{ {att.ip} }}",
            f'delete element bridge {t} sources {{ "{att.veth}" . {att.mac} . {att.ip} }}',
            f'delete element bridge {t} ports {{ "{att.veth}" }}']


def acct_rules(table: Table, attachments: Iterable[Attachment]) -> str:
    """The accounting chain, whole (one transaction with whatever else is changing). Only connections whose
    handshake completed (assured) count: a spoofed SYN and the instance's answers to it are not traffic that keeps
    the instance alive."""
    t = table.name
    rules = [f"flush chain ip {t} acct"]
    # A UDP flow is never assured unless it lasts (a DNS query and its answer are not): it counts once the
    # app has answered it (seen-reply), which a spoofed datagram's flow never is.
    for att in attachments:
        m, mine = att.mark, f"ct mark & {NOT_COUNTED:#x} == {att.mark:#x}"
        for proven in ("meta l4proto tcp ct status assured", "meta l4proto udp ct status seen-reply"):
            rules.append(f"add rule ip {t} acct ct mark {m:#x} {proven} counter name conns_{m:x} "
                         f"ct mark set ct mark | {COUNTED:#x}")
            rules.append(f"add rule ip {t} acct {mine} {proven} ct direction original counter name in_{m:x}")
            rules.append(f"add rule ip {t} acct {mine} {proven} ct direction reply counter name out_{m:x}")
    return "\n".join(rules)


# --- services: counters, limits, timeouts, amplification ----------------------------------------------------


def jumps(listen: Iterable[ListenAddress], chain: str, protocols: tuple[str, ...] = ("tcp",)) -> list[str]:
    """What matches a service's IPv4 listen addresses, each followed by a jump to chain."""
    out = []
    for addr in listen:
        ip = ipaddress.ip_address(addr.host)
        if ip.version != 4:
            continue  # IPv6 listen addresses stay on the userspace path (see docs/architecture.md)
        match = "fib daddr type local" if ip.is_unspecified else f"ip daddr {ip}"
        out += [f"{match} {proto} dport {addr.port} jump {chain}" for proto in protocols]
    return out


def counter_rules(table: Table, service: str) -> list[str]:
    name = ident(service)
    return [f"add counter ip {table.name} rejected_{name}", f"add counter ip {table.name} steered_{name}",
            f"add counter ip {table.name} amplified_{name}"]


def limit_rules(table: Table, limits: Mapping[str, ServiceLimits]) -> list[str]:
    """Both limit chains, the timeouts chain and the amplification chains, whole (a reload changes one service's
    limit without touching others)."""
    t = table.name
    cmds = [f"flush chain ip {t} limit_in", f"flush chain ip {t} limit_out", f"flush chain ip {t} timeouts",
            f"flush chain ip {t} handoff", *amplify_rules(table, limits)]
    for service, lim in limits.items():
        matches = [rule.rsplit(" jump ", 1)[0] for rule in jumps(lim.listen, "-")]
        if lim.handoff:
            # A handoff service's apps accept from its socket with no rule of ours in the way: its connections
            # are counted here, once each, when the handshake completes (assured: a SYN that never finishes is
            # not a connection; the COUNTED bit of the entry's mark: the rest of its packets are not counted
            # again), by the service's steered counter. The activator's own connections to the socket are in it
            # too (what it accepted, what it made to pass a held one on): handoff.py takes those off.
            cmds += [f"add rule ip {t} handoff {match} ct direction original ct status assured "
                     f"ct mark & {COUNTED:#x} == 0 counter name steered_{ident(service)} "
                     f"ct mark set ct mark | {COUNTED:#x}" for match in matches]
        policy = lim.timeout_policy
        cmds.append(f"add ct timeout ip {t} {policy} {{ protocol tcp; l3proto ip; policy = {{ "
                    f"syn_sent: {SYN_TIMEOUT}, syn_recv: {SYN_TIMEOUT}"
                    + (f", established: {lim.idle_seconds}" if lim.idle_seconds else "") + " }; }")
        cmds += [f'add rule ip {t} timeouts {match} ct timeout set "{policy}"' for match in matches]
        if (udp := lim.udp_policy) is not None:  # a UDP flow's idleness, both before and after a reply
            secs = udp.removeprefix("udp_")
            # Unanswered (a forged source's flow is never answered) it goes sooner; it counts only once
            # answered anyway (acct_rules, sampling.connections()).
            unanswered = min(int(secs), UNANSWERED_TIMEOUT)
            cmds.append(f"add ct timeout ip {t} {udp} {{ protocol udp; l3proto ip; policy = {{ "
                        f"unreplied: {unanswered}, replied: {secs} }}; }}")
            cmds += [f'add rule ip {t} timeouts {rule.rsplit(" jump ", 1)[0]} ct timeout set "{udp}"'
                     for rule in jumps(lim.listen, "-", ("udp",))]
        if lim.max_connections is None:
            continue
        reject = (f"ct state new ct count over {lim.max_connections} counter name rejected_{ident(service)} "
                  "reject with tcp reset")
        for match in matches:
            cmds += [f"add rule ip {t} limit_in {match} {reject}", f"add rule ip {t} limit_out {match} {reject}"]
    return cmds


def amplify_rules(table: Table, limits: Mapping[str, ServiceLimits]) -> list[str]:
    """Replies of kernel-path UDP flows bounded by what their clients sent (udp_reply_ratio): base chains of
    their own just before the filter ones (forward: remote clients; input: the host's own), whole.
    Conntrack has counted the packet in hand already (nftables' ct bytes turn on conntrack accounting), and a
    dropped reply still counts: the client is owed more only when it sends more."""
    t = table.name
    cmds = [f"add chain ip {t} amplify", f"flush chain ip {t} amplify"]
    for hook, chain in (("forward", "amplify_fwd"), ("input", "amplify_in")):
        cmds += [f"add chain ip {t} {chain} {{ type filter hook {hook} priority -1; policy accept; }}",
                 f"flush chain ip {t} {chain}",
                 f"add rule ip {t} {chain} ct direction reply ct status dnat meta l4proto udp "
                 f"ct mark & {MARK_MASK:#x} == {table.mark_base:#x} jump amplify"]
    for service, lim in limits.items():
        if lim.udp_flow_timeout is None:
            continue
        name = ident(service)
        chain = f"amp_{name}"
        cmds += [f"add chain ip {t} {chain}", f"flush chain ip {t} {chain}"]
        for addr in lim.listen:
            ip = ipaddress.ip_address(addr.host)
            if ip.version != 4:
                continue
            daddr = "" if ip.is_unspecified else f" ct original ip daddr {ip}"
            # `meta l4proto udp` first: without it nftables cannot type the port
            cmds.append(f"add rule ip {t} amplify meta l4proto udp{daddr} ct original proto-dst {addr.port} "
                        f"jump {chain}")
        # (`nft list` shows these two comparisons merged into one range: a display bug of nftables 1.0.6,
        # the rules loaded are as written)
        for low, high in itertools.pairwise(AMPLIFY_STEPS):
            cmds += [f"add rule ip {t} {chain} ct original bytes < {high} ct reply bytes > "
                     f"{math.floor(lim.udp_reply_ratio * low)} counter name amplified_{name} drop",
                     f"add rule ip {t} {chain} ct original bytes < {high} return"]
    return cmds


# --- steering ---------------------------------------------------------------------------------------------------


def steer_chain(service: str) -> str:
    return f"svc_{ident(service)}"


def hook_rules(table: Table, service_jumps: Sequence[str]) -> list[str]:
    """A service's jumps, in both nat hooks (remote clients arrive in prerouting, the host's own in output)."""
    return [f"add rule ip {table.name} {hook} {j}" for hook in HOOKS for j in service_jumps]


def steer_chain_rules(table: Table, service: str, service_jumps: Sequence[str]) -> list[str]:
    """A service's steering chain and the jumps to it, installed once: steer_rules fills the chain."""
    return [f"add chain ip {table.name} {steer_chain(service)}", *hook_rules(table, service_jumps)]


def steer_rules(table: Table, service: str, backends: Sequence[Backend], exempt: Sequence[str] = ()) -> list[str]:
    """The service's chain, whole: new connections round robin over backends in this order, the `exempt`
    networks' (its probers') never; with no backend it is empty (the activator's own listener takes them)."""
    t, chain = table.name, steer_chain(service)
    cmds = [f"flush chain ip {t} {chain}"]
    if backends and exempt:
        cmds.append(f"add rule ip {t} {chain} ip saddr {{ {', '.join(exempt)} }} return")
    if backends:
        marks = ", ".join(f"{i} : {b.mark:#x}" for i, b in enumerate(backends))
        targets = ", ".join(f"{b.mark:#x} : {b.ip} . {b.port}" for b in backends)
        # A SYN only: a segment of a connection conntrack no longer knows (idle-timed out, flushed) is not
        # picked up mid-stream by some instance; it reaches the host, which resets it.
        # A UDP flow's first datagram (conntrack: new); later ones follow its entry, so a flow is never split.
        for first in ("tcp flags & (fin|syn|rst|ack) == syn", "meta l4proto udp ct state new"):
            cmds.append(f"add rule ip {t} {chain} {first} ct mark set numgen inc mod {len(backends)} "
                        f"map {{ {marks} }}")
            cmds.append(f"add rule ip {t} {chain} {first} counter name steered_{ident(service)} "
                        f"dnat ip to ct mark map {{ {targets} }}")
    return cmds


def forget_rules(table: Table, service: str, *, steered: Mapping[str, Sequence[str]],
                 limits: Mapping[str, ServiceLimits], udp: bool, chain: bool, counters: bool) -> list[str]:
    """A service out of the kernel path: both hooks and the limits rebuilt from what remains (steered: the other
    services' jumps; limits: theirs), then its amplification chain (udp), its steering chain (chain) and its
    counters (counters) deleted. No jump to either chain is left when they go: the hooks are flushed first."""
    t, name = table.name, ident(service)
    cmds = [f"flush chain ip {t} prerouting", f"flush chain ip {t} output"]
    for service_jumps in steered.values():
        cmds += hook_rules(table, service_jumps)
    cmds += limit_rules(table, limits)
    if udp:
        cmds += [f"flush chain ip {t} amp_{name}", f"delete chain ip {t} amp_{name}"]
    if chain:
        cmds += [f"flush chain ip {t} svc_{name}", f"delete chain ip {t} svc_{name}"]
    if counters:
        cmds += [f"delete counter ip {t} rejected_{name}", f"delete counter ip {t} steered_{name}",
                 f"delete counter ip {t} amplified_{name}"]
    return cmds
