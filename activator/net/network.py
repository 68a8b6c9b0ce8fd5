"""Instance networking, host side: a bridge and a subnet owned by this activator, a veth per instance, and one
nftables table that gives instances outbound access and steers clients to them in the kernel.

    client ──> host address:port ──nat (output / prerouting)──> svc chain: DNAT to a live instance (round robin,
                                                               ct mark = the instance's), or nothing (no
                                                               instance: the activator's own listener gets it)
    instance eth0 (10.89.0.N) ──veth──> bridge (10.89.0.1, the gateway) ──forward + masquerade──> the world

- Addresses: the subnet's first address is the bridge's; instances get the lowest free one. Allocation is in
  memory: no instance outlives its daemon (a crashed run's are removed before anything is allocated), so no
  two live instances can share one.
- Marks: every connection steered to an instance carries the conntrack mark (this daemon's base | host index),
  which is how the activator counts an instance's kernel-path connections (a conntrack dump filtered by mark in the
  kernel) and removes their entries when it goes. Its own outbound connections carry EGRESS | host index
  instead: they do not keep it alive, and they are flushed with it too.
- Loopback clients: DNAT of 127.0.0.1 to the bridge needs route_localnet, which is enabled on the bridge only,
  never host-wide (CVE-2020-8558), and such connections are masqueraded, so the app sees the bridge's address
  (10.89.0.1). Remote clients keep their own address.
- Docker sets the FORWARD policy to DROP, and a drop in any base chain wins over an accept in ours: firewall.py
  makes the hole in iptables for the bridge (and names Docker's networks, which the table keeps instances out of).
- Instances are reachable only through the steering rules: new connections into the bridge that were not
  DNATed are dropped. `egress: false` instances may not open connections (new connections from their address
  are dropped in forward and input), but answer the ones steered to them.
- The bridge's own address is for instances and the host: services listen there for instances (a dependency, a
  Compose service with no published port). A packet for it that comes in on any other interface (a neighbour
  that routes the subnet through this host, a Docker container) is dropped: in input, and in forward when the
  kernel path has DNATed it to an instance (its original destination is checked). Only the original direction:
  replies of an instance's connection to a port the host publishes (Docker's) come back on Docker's bridge.
- Tenants are strangers (docs/security.md). A `bridge` table lets no frame cross from one instance's port to
  another's, whatever its protocol, except a connection DNATed to that instance through a service address
  (br_netfilter bridges those; bridge port isolation would drop them, hence a table and not isolation), and
  lets each port send only from its own MAC and IPv4 address (IPv4 and ARP; nothing else, IPv6 included), so
  no instance can spoof another's address, escape `egress: false` or put a forged source on the uplink. IPv6 is
  off on the bridge and on every instance's eth0 (no link-local path around the IPv4 rules). Packets from the
  bridge to 127.0.0.0/8 are dropped before routing (route_localnet must stay on for DNAT from loopback clients:
  the CVE-2020-8558 class), and instances may not reach Docker's own networks except through published ports.
- One daemon's marks: the top twelve bits are a tag and this daemon's slot, chosen at open() so that two
  daemons on two bridges never count, flush or steer each other's connections (the slot is written in the
  table's comment, where the next daemon reads it).
- Half-open connections (SYN_SENT, SYN_RECV) of the kernel path time out after SYN_TIMEOUT seconds and do not
  count as open: a spoofed SYN flood can neither pin an instance nor scale a service out. A service's
  client_idle_timeout is its connections' conntrack idle timeout on the kernel path; when it expires the
  client's next segment is not steered (only a SYN is) and the host answers it with a reset.

Everything here is blocking (netlink, libnftables, iptables): callers run it in worker threads, except the
sub-millisecond steering updates (libnftables only). pyroute2 in particular must never be called on the event
loop's thread: its synchronous API then tries to open its netlink socket on the running (uvloop) loop, fails,
and leaves a handle behind that keeps the loop from closing.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import itertools
import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from activator.config.model import ListenAddress, NetworkSettings, ServiceConfig
from activator.errors import ActivatorError
from activator.statedir import in_use as statedir_in_use

from . import conntrack, firewall
from .firewall import FirewallHole
from .netns import HOME_NS, NetNamespace
from .nft import Nft, NftError, ifname

log = logging.getLogger("activator.network")

MARK_TAG = 0xA0000000  # every activator's marks: 0xA, then an 8-bit daemon slot, the egress bit, the host index
MARK_MASK = 0xFFF00000  # one daemon's marks
SLOT_SHIFT = 20
EGRESS = 0x00080000  # within the host-index bits: a /16 has fewer than 2^19 hosts
#: set on a steered connection once it is counted as one the instance served (the first packet after its
#: handshake): a SYN that never completes is never counted
COUNTED = 0x00040000
INDEX_MASK = COUNTED - 1
NOT_COUNTED = 0xFFFFFFFF & ~COUNTED
VETH_PREFIX = "av"
#: conntrack TCP states of a connection in use (ESTABLISHED .. LAST_ACK); TIME_WAIT/CLOSE are over
OPEN_TCP_STATES = frozenset({3, 4, 5, 6})
#: a handshake not finished (SYN_SENT, SYN_RECV, SYN_SENT2): not yet a connection, maybe a spoofed SYN
HALF_OPEN_TCP_STATES = frozenset({1, 2, 9})
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
#: a packet mark: "DNATed to an instance by a steering rule", set in the ip table's forward chain. With
#: br_netfilter on (Docker turns it on), a connection from one instance to a service address whose backend is
#: another instance is bridged port to port after the DNAT; the bridge table lets exactly those frames cross.
HAIRPIN = 0x00200000


@dataclass(frozen=True)
class Attachment:
    """One instance's (or template's) place on the network."""

    name: str
    ip: ipaddress.IPv4Address
    index: int  # host index in the subnet
    egress: bool
    base: int  # the daemon's mark base
    bridge: str

    @property
    def mark(self) -> int:
        return self.base | self.index

    @property
    def veth(self) -> str:
        # the bridge in the hash: two daemons may both have an instance named web-1
        return VETH_PREFIX + hashlib.sha1(f"{self.bridge}/{self.name}".encode()).hexdigest()[:10]

    @property
    def mac(self) -> str:
        """Derived from the address, so the bridge table knows it before the link exists."""
        return mac_of(self.ip)


def mac_of(ip: ipaddress.IPv4Address) -> str:
    """A locally administered MAC for an address of the subnet (the bridge's and each instance's)."""
    return "02:ac:" + ":".join(f"{b:02x}" for b in ip.packed)


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


@dataclass
class Sample:
    """One instance's kernel path, as of the last look: open connections and traffic counters."""

    open: int = 0
    packets: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    served: int = 0  # connections it has served on the kernel path (handshake done), since its counters began


@dataclass
class Samples:
    by_mark: dict[int, Sample]
    rejected: dict[str, int]  # connections refused for max_connections, by service
    steered: dict[str, int]  # new connections sent to an instance, by service
    amplified: dict[str, int] = field(default_factory=dict)  # UDP replies dropped over udp_reply_ratio, by service


def _ident(name: str) -> str:
    """A name as an nftables identifier, one to one: web-a and web_a must never share a chain or a counter."""
    # a prefix code: every '_' of the result starts a two-character escape
    return re.sub(r"[^A-Za-z0-9]", lambda m: _ESCAPES.get(m.group(), f"_x{ord(m.group()):02x}"), name)


_ESCAPES = {"-": "_d", "_": "_u", ".": "_p"}


class HostNetwork:
    def __init__(self, settings: NetworkSettings, *, owner: Path, config_path: Path | None = None) -> None:
        ifname(settings.bridge)  # it goes into rule text and a table's name: refused here, before anything is made
        self.bridge = settings.bridge
        self.subnet = settings.subnet
        self.gateway = next(self.subnet.hosts())
        self.owner = str(owner)
        self.table = f"activator_{_ident(self.bridge)}"
        self.where = f"{config_path}: settings.network" if config_path else "settings.network"
        self.mark_base = MARK_TAG  # this daemon's slot is chosen by open()
        self._lock = threading.Lock()
        self._used: dict[int, str] = {}
        self._steered: dict[str, list[str]] = {}  # service -> its chain's jump rules, installed once
        self._backends: dict[str, list[Backend]] = {}  # service -> what its chain should steer to (for repair)
        self._exempt: dict[str, tuple[str, ...]] = {}  # service -> the IPv4 networks its chain never steers (probers)
        self.firewall = FirewallHole(self.bridge)
        #: set when a rule change failed (a firewall reload took the table?): the next check repairs
        self.broken = False
        self._limits: dict[str, ServiceLimits] = {}
        self._nft: Nft | None = None
        self._plugged: dict[str, Attachment] = {}
        # What open() made, so close() undoes exactly that: a daemon refused at start must not touch what a
        # running neighbour on the same bridge owns.
        self._made: set[str] = set()

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    # --- lifecycle (blocking) -------------------------------------------------------------------------------

    def open(self) -> None:
        """Check the subnet and the bridge name, then make the bridge, the sysctls, the tables, the firewall hole."""
        self.nft  # noqa: B018 - a missing libnftables is a one-line error before anything is made
        with IPRoute() as ipr:
            self._check_subnet(ipr)
            idx = self._ensure_bridge(ipr)
            self._made.add("bridge")
            for addr in ipr.get_addr(index=idx, family=2):
                if addr.get_attr("IFA_ADDRESS") != str(self.gateway):
                    ipr.addr("del", index=idx, address=addr.get_attr("IFA_ADDRESS"), prefixlen=addr["prefixlen"])
            with contextlib.suppress(Exception):  # already there from a previous run
                ipr.addr("add", index=idx, address=str(self.gateway), prefixlen=self.subnet.prefixlen)
            # No IPv6 on the bridge: the host is not reachable from instances over link-local addresses.
            _sysctl(f"net/ipv6/conf/{self.bridge}/disable_ipv6", "1", missing_ok=True)
            # A fixed MAC: a bridge left to itself takes its lowest port's, which changes as instances come and go
            # (every instance's neighbour entry for the gateway would go stale).
            ipr.link("set", index=idx, address=mac_of(self.gateway), state="up")
            self._bridge_index = idx
        # route_localnet on our bridge only (CVE-2020-8558): DNAT of loopback clients needs it; what arrives from
        # the bridge for 127.0.0.0/8 is dropped by the table's guard.
        _sysctl(f"net/ipv4/conf/{self.bridge}/route_localnet", "1")
        if _sysctl("net/ipv4/ip_forward", None) != "1":
            log.warning("enabling net.ipv4.ip_forward (host-wide, and left on at stop as Docker does): instances "
                        "need it to reach anything beyond the host")
            _sysctl("net/ipv4/ip_forward", "1")
        self.mark_base = self._choose_marks()
        self._made.add("table")
        self._install_table()
        flush_conntrack([self.mark_base], mask=MARK_MASK)  # a dead run's entries would count against new instances
        self._made.add("firewall")
        self.firewall.open()

    def close(self) -> None:
        """Undo what open() did: the tables, the firewall rules, the bridge; nothing it did not make. Each step
        runs whatever an earlier one raised; one ActivatorError at the end names every step that failed."""
        errors: list[str] = []

        def step(what: str, fn: Callable[[], object]) -> None:
            try:
                fn()
            except Exception as e:
                errors.append(f"{what}: {e}")

        def delete_tables() -> None:
            present = {(t["table"]["family"], t["table"]["name"]) for t in self.nft.query("list tables")
                       if "table" in t}
            for family in ("ip", "bridge"):
                if (family, self.table) in present:  # a flushed ruleset took them already: nothing to do
                    self.nft.run(f"delete table {family} {self.table}")

        def delete_bridge() -> None:
            with IPRoute() as ipr:
                for idx in ipr.link_lookup(ifname=self.bridge):
                    if self._owned(ipr, idx):
                        ipr.link("del", index=idx)

        if "table" in self._made:
            step("nftables", delete_tables)
            step("conntrack", lambda: flush_conntrack([self.mark_base], mask=MARK_MASK))
        if "firewall" in self._made:
            step("iptables", lambda: firewall.close(self.bridge))
        if "bridge" in self._made:
            step("bridge", delete_bridge)
        self._made.clear()
        if self._nft is not None:
            self._nft.close()
            self._nft = None
        if errors:
            raise ActivatorError("; ".join(errors))

    def remove_leftovers(self) -> list[str]:
        """What a crashed run left that the next open() would not replace: our veths still on the bridge, the
        steering tables (a dead daemon's rules keep steering to instances that are about to be removed). A bridge
        of a live activator is refused here, before anything is touched."""
        found: list[str] = []
        with IPRoute() as ipr:
            bridges = ipr.link_lookup(ifname=self.bridge)
            if bridges:
                self._claim(ipr, bridges[0])  # raises if another live daemon (or anything else) has it
        for family in ("ip", "bridge"):
            with contextlib.suppress(NftError):
                if any(t.get("table", {}).get("name") == self.table for t in self.nft.query(f"list tables {family}")):
                    self.nft.run(f"delete table {family} {self.table}")
                    found.append(f"nftables table {family} {self.table}")
        with IPRoute() as ipr:
            bridges = ipr.link_lookup(ifname=self.bridge)
            if bridges and self._owned(ipr, bridges[0]):
                for link in ipr.get_links():
                    name = link.get_attr("IFLA_IFNAME")
                    if name.startswith(VETH_PREFIX) and link.get_attr("IFLA_MASTER") == bridges[0]:
                        with contextlib.suppress(Exception):
                            ipr.link("del", index=link["index"])
                            found.append(f"veth {name}")
        return found

    def _choose_marks(self) -> int:
        """This daemon's mark base: a slot no other live activator's table names (their comments say theirs)."""
        taken = set()
        with contextlib.suppress(NftError):
            for item in self.nft.query("list tables ip"):
                t = item.get("table", {})
                m = re.fullmatch(r"activator marks (0x[0-9a-f]+)", str(t.get("comment", "")))
                if m and t.get("name") != self.table:
                    taken.add(int(m.group(1), 16))
        first = int(hashlib.sha1(self.bridge.encode()).hexdigest(), 16) % 255 + 1  # stable across restarts
        for k in range(255):
            base = MARK_TAG | (((first + k - 1) % 255 + 1) << SLOT_SHIFT)
            if base not in taken:
                return base
        raise ActivatorError(f"{self.where}: 255 activator networks already run on this host")

    def _check_subnet(self, ipr: IPRoute) -> None:
        ours = set(ipr.link_lookup(ifname=self.bridge))
        for addr in ipr.get_addr(family=2):
            if addr["index"] in ours:
                continue
            net = ipaddress.IPv4Network(f"{addr.get_attr('IFA_ADDRESS')}/{addr['prefixlen']}", strict=False)
            if net.overlaps(self.subnet):
                name = addr.get_attr("IFA_LABEL") or f"interface {addr['index']}"
                raise ActivatorError(f"{self.where}.subnet: {self.subnet} overlaps {net} on {name}; pick a private "
                                     "range the host does not use (e.g. 10.89.0.0/24)")
        for route in ipr.get_routes(family=2, table=254):
            if route.get_attr("RTA_OIF") in ours or not route["dst_len"]:
                continue
            net = ipaddress.IPv4Network(f"{route.get_attr('RTA_DST')}/{route['dst_len']}", strict=False)
            if net.overlaps(self.subnet):
                raise ActivatorError(f"{self.where}.subnet: {self.subnet} overlaps the host's route to {net}; pick "
                                     "a private range the host does not use (e.g. 10.89.0.0/24)")

    def _alias(self) -> str:
        return f"activator {self.owner}"

    def _owned(self, ipr: IPRoute, idx: int) -> bool:
        """Ours, or a dead activator's (adopted then: its leftovers are ours to remove)."""
        (link,) = ipr.get_links(idx)
        alias = link.get_attr("IFLA_IFALIAS")
        if alias == self._alias():
            return True
        if alias and alias.startswith("activator /") and not statedir_in_use(Path(alias.split(" ", 1)[1])):
            log.warning("adopting bridge %s from a dead activator (%s)", self.bridge, alias.split(" ", 1)[1])
            ipr.link("set", index=idx, ifalias=self._alias())
            return True
        return False

    def _claim(self, ipr: IPRoute, idx: int) -> None:
        """The existing interface named like our bridge is ours (or a dead activator's), or a one-line error."""
        (link,) = ipr.get_links(idx)
        info = link.get_attr("IFLA_LINKINFO")
        kind = info.get_attr("IFLA_INFO_KIND") if info else None
        alias = link.get_attr("IFLA_IFALIAS")
        if kind != "bridge" or not self._owned(ipr, idx):
            what = f"a {kind or 'network'} interface" + (f" ({alias})" if alias else "")
            raise ActivatorError(f"{self.where}.bridge: '{self.bridge}' is already {what} that this activator "
                                 "did not make; set settings.network.bridge to a free name")

    def _ensure_bridge(self, ipr: IPRoute) -> int:
        found = ipr.link_lookup(ifname=self.bridge)
        if found:
            self._claim(ipr, found[0])
            return int(found[0])
        try:
            ipr.link("add", ifname=self.bridge, kind="bridge")
        except Exception as e:
            raise ActivatorError(f"{self.where}.bridge: cannot create bridge '{self.bridge}': {e}") from None
        idx = int(ipr.link_lookup(ifname=self.bridge)[0])
        ipr.link("set", index=idx, ifalias=self._alias())
        return idx

    def _install_table(self) -> None:
        br, net, t = ifname(self.bridge), self.subnet, self.table
        for family in ("ip", "bridge"):
            with contextlib.suppress(NftError):
                self.nft.run(f"delete table {family} {t}")
        docker = " ".join(f'iifname {br} oifname {ifname(name)} ct status & dnat == 0 drop\n'
                          for name in sorted({"docker0", "br-*", *firewall.docker_bridges()}))
        self.nft.run(f"""
table ip {t} {{
    comment "activator marks {self.mark_base:#x}"
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
        iifname != {br} ct direction original ct original ip daddr {self.gateway} counter name outsiders drop
        iifname {br} ip saddr @noegress ct state new drop
        oifname {br} ct state new ct status dnat accept
        oifname {br} ct state new drop
        jump acct
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname {br} ip saddr @noegress ct state new drop
        iifname != "lo" iifname != {br} ct direction original ip daddr {self.gateway} counter name outsiders drop
        jump acct
    }}
    chain acct_out {{ type filter hook output priority filter; policy accept; jump acct; }}
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
}}""")

    # --- instances (blocking) -------------------------------------------------------------------------------

    def allocate(self, name: str, egress: bool) -> Attachment:
        with self._lock:
            hosts = self.subnet.num_addresses - 2
            for index in range(2, hosts + 1):
                if index not in self._used:
                    self._used[index] = name
                    return Attachment(name, self.subnet.network_address + index, index, egress, self.mark_base,
                                      self.bridge)
        raise ActivatorError(f"{self.where}.subnet: {self.subnet} has no free address left for '{name}'; use a "
                             "larger subnet")

    def plug(self, att: Attachment, ns: NetNamespace) -> None:
        """The instance's eth0, made directly inside its namespace (moving a veth between namespaces is slow
        under the rtnl lock), on the bridge, addressed, with a default route; its rules in the tables. Its port
        and allowed sources are in the bridge table before the link exists."""
        with self._lock:
            self._plugged[att.name] = att
            self.nft.run("\n".join(self._plug_rules(att)) + "\n" + self._acct_rules())
        with IPRoute() as ipr:
            ipr.link("add", ifname=att.veth, kind="veth",
                     peer={"ifname": "eth0", "net_ns_fd": ns.fd, "address": att.mac})
            (idx,) = ipr.link_lookup(ifname=att.veth)
            _sysctl(f"net/ipv6/conf/{att.veth}/disable_ipv6", "1", missing_ok=True)
            ipr.link("set", index=idx, master=self._bridge_index, state="up")
        pyroute2_netns.setns(ns.fd)
        try:
            # This thread's /proc/sys/net is the instance's namespace now. No IPv6 on eth0 (no link-local
            # address to reach the host or other instances around the IPv4 rules); lo keeps ::1. Ping without
            # CAP_NET_RAW, through ICMP datagram sockets, as Docker allows it.
            _sysctl("net/ipv6/conf/eth0/disable_ipv6", "1", missing_ok=True)
            _sysctl("net/ipv4/ping_group_range", "0 2147483647")
            with IPRoute() as inner:
                (eth0,) = inner.link_lookup(ifname="eth0")
                inner.addr("add", index=eth0, address=str(att.ip), prefixlen=self.subnet.prefixlen)
                inner.link("set", index=eth0, state="up")
                inner.route("add", dst="default", gateway=str(self.gateway))
        finally:
            pyroute2_netns.setns(HOME_NS)

    def _plug_rules(self, att: Attachment) -> list[str]:
        t, m = self.table, att.mark
        cmds = [f"add counter ip {t} in_{m:x}", f"add counter ip {t} out_{m:x}", f"add counter ip {t} conns_{m:x}",
                f"add element ip {t} egress_marks {{ {att.ip} : {m | EGRESS:#x} }}",
                f'add element bridge {t} ports {{ "{att.veth}" }}',
                f'add element bridge {t} sources {{ "{att.veth}" . {att.mac} . {att.ip} }}']
        if not att.egress:
            cmds.append(f"add element ip {t} noegress {{ {att.ip} }}")
        return cmds

    def unplug(self, att: Attachment) -> None:
        """Undo plug() and free the address; whatever is already gone is fine."""
        with IPRoute() as ipr, contextlib.suppress(Exception):
            for idx in ipr.link_lookup(ifname=att.veth):
                ipr.link("del", index=idx)
        t, m = self.table, att.mark
        with self._lock:
            self._plugged.pop(att.name, None)
            with contextlib.suppress(NftError):
                self.nft.run(self._acct_rules())
            for cmd in (f"delete counter ip {t} in_{m:x}", f"delete counter ip {t} out_{m:x}",
                        f"delete counter ip {t} conns_{m:x}",
                        f"delete element ip {t} egress_marks {{ {att.ip} }}",
                        f"delete element ip {t} noegress {{ {att.ip} }}",
                        f'delete element bridge {t} sources {{ "{att.veth}" . {att.mac} . {att.ip} }}',
                        f'delete element bridge {t} ports {{ "{att.veth}" }}'):
                with contextlib.suppress(NftError):
                    self.nft.run(cmd)
        flush_conntrack([m, m | EGRESS], mask=NOT_COUNTED)
        with self._lock:
            self._used.pop(att.index, None)

    def _acct_rules(self) -> str:
        """The accounting chain, rebuilt whole (one transaction with whatever else is changing). Only connections
        whose handshake completed (assured) count: a spoofed SYN and the instance's answers to it are not traffic
        that keeps the instance alive."""
        t = self.table
        rules = [f"flush chain ip {t} acct"]
        # A UDP flow is never assured unless it lasts (a DNS query and its answer are not): it counts once the
        # app has answered it (seen-reply), which a spoofed datagram's flow never is.
        for att in self._plugged.values():
            m, mine = att.mark, f"ct mark & {NOT_COUNTED:#x} == {att.mark:#x}"
            for proven in ("meta l4proto tcp ct status assured", "meta l4proto udp ct status seen-reply"):
                rules.append(f"add rule ip {t} acct ct mark {m:#x} {proven} counter name conns_{m:x} "
                             f"ct mark set ct mark | {COUNTED:#x}")
                rules.append(f"add rule ip {t} acct {mine} {proven} ct direction original counter name in_{m:x}")
                rules.append(f"add rule ip {t} acct {mine} {proven} ct direction reply counter name out_{m:x}")
        return "\n".join(rules)

    # --- steering -------------------------------------------------------------------------------------------

    def _jumps(self, listen: Iterable[ListenAddress], chain: str, protocols: tuple[str, ...] = ("tcp",)) -> list[str]:
        jumps = []
        for addr in listen:
            ip = ipaddress.ip_address(addr.host)
            if ip.version != 4:
                continue  # IPv6 listen addresses stay on the userspace path (see docs/architecture.md)
            match = "fib daddr type local" if ip.is_unspecified else f"ip daddr {ip}"
            jumps += [f"{match} {proto} dport {addr.port} jump {chain}" for proto in protocols]
        return jumps

    def limit(self, service: str, listen: Iterable[ListenAddress], max_connections: int | None,
              client_idle_timeout: float | None = None, udp_flow_timeout: float | None = None,
              udp_reply_ratio: float = 3.0) -> None:
        """The service's kernel-side counters, its max_connections enforced before DNAT on the listen address
        (one count for both paths, the kernel's and the activator's own listener), and its connections'
        conntrack timeouts (half-open: SYN_TIMEOUT; idle: client_idle_timeout). Installed at start, before any
        connection is accepted, so every one is counted."""
        name = _ident(service)
        self._limits[service] = ServiceLimits(tuple(listen), max_connections, client_idle_timeout, udp_flow_timeout,
                                              udp_reply_ratio)
        self.nft.run("\n".join([f"add counter ip {self.table} rejected_{name}",
                                f"add counter ip {self.table} steered_{name}",
                                f"add counter ip {self.table} amplified_{name}", *self._limit_rules()]))

    def _limit_rules(self) -> list[str]:
        """Both limit chains and the timeouts chain, rebuilt whole (a reload changes one service's limit without
        touching others)."""
        t = self.table
        cmds = [f"flush chain ip {t} limit_in", f"flush chain ip {t} limit_out", f"flush chain ip {t} timeouts",
                *self._amplify_rules()]
        for service, lim in self._limits.items():
            matches = [rule.rsplit(" jump ", 1)[0] for rule in self._jumps(lim.listen, "-")]
            policy = lim.timeout_policy
            cmds.append(f"add ct timeout ip {t} {policy} {{ protocol tcp; l3proto ip; policy = {{ "
                        f"syn_sent: {SYN_TIMEOUT}, syn_recv: {SYN_TIMEOUT}"
                        + (f", established: {lim.idle_seconds}" if lim.idle_seconds else "") + " }; }")
            cmds += [f'add rule ip {t} timeouts {match} ct timeout set "{policy}"' for match in matches]
            if (udp := lim.udp_policy) is not None:  # a UDP flow's idleness, both before and after a reply
                secs = udp.removeprefix("udp_")
                # Unanswered (a forged source's flow is never answered) it goes sooner; it counts only once
                # answered anyway (_acct_rules, connections()).
                unanswered = min(int(secs), UNANSWERED_TIMEOUT)
                cmds.append(f"add ct timeout ip {t} {udp} {{ protocol udp; l3proto ip; policy = {{ "
                            f"unreplied: {unanswered}, replied: {secs} }}; }}")
                cmds += [f'add rule ip {t} timeouts {rule.rsplit(" jump ", 1)[0]} ct timeout set "{udp}"'
                         for rule in self._jumps(lim.listen, "-", ("udp",))]
            if lim.max_connections is None:
                continue
            reject = (f"ct state new ct count over {lim.max_connections} counter name rejected_{_ident(service)} "
                      "reject with tcp reset")
            for match in matches:
                cmds += [f"add rule ip {t} limit_in {match} {reject}", f"add rule ip {t} limit_out {match} {reject}"]
        return cmds

    def _amplify_rules(self) -> list[str]:
        """Replies of kernel-path UDP flows bounded by what their clients sent (udp_reply_ratio): base chains of
        their own just before the filter ones (forward: remote clients; input: the host's own), rebuilt whole.
        Conntrack has counted the packet in hand already (nftables' ct bytes turn on conntrack accounting), and a
        dropped reply still counts: the client is owed more only when it sends more."""
        t = self.table
        cmds = [f"add chain ip {t} amplify", f"flush chain ip {t} amplify"]
        for hook, chain in (("forward", "amplify_fwd"), ("input", "amplify_in")):
            cmds += [f"add chain ip {t} {chain} {{ type filter hook {hook} priority -1; policy accept; }}",
                     f"flush chain ip {t} {chain}",
                     f"add rule ip {t} {chain} ct direction reply ct status dnat meta l4proto udp "
                     f"ct mark & {MARK_MASK:#x} == {self.mark_base:#x} jump amplify"]
        for service, lim in self._limits.items():
            if lim.udp_flow_timeout is None:
                continue
            name = _ident(service)
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

    def forget(self, service: str, *, counters: bool) -> None:
        """Take a service out of the kernel path entirely (a reload removed or redefined it): its jumps, its
        chain and its limit; its counters too when it is gone for good. Connections already DNATed keep going
        (conntrack holds their translation). Blocking."""
        t, name = self.table, _ident(service)
        lim = self._limits.pop(service, None)
        had_chain = self._steered.pop(service, None) is not None
        cmds = [f"flush chain ip {t} prerouting", f"flush chain ip {t} output"]
        for jumps in self._steered.values():
            cmds += [f"add rule ip {t} {hook} {j}" for hook in ("prerouting", "output") for j in jumps]
        cmds += self._limit_rules()
        if lim is not None and lim.udp_flow_timeout is not None:  # no jump to it left (flushed just above)
            cmds += [f"flush chain ip {t} amp_{name}", f"delete chain ip {t} amp_{name}"]
        if had_chain:
            cmds += [f"flush chain ip {t} svc_{name}", f"delete chain ip {t} svc_{name}"]
        if counters:
            cmds += [f"delete counter ip {t} rejected_{name}", f"delete counter ip {t} steered_{name}",
                     f"delete counter ip {t} amplified_{name}"]
        self.nft.run("\n".join(cmds))

    def steer(self, service: str, listen: Iterable[ListenAddress], backends: list[Backend],
              exempt: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = (),
              protocols: tuple[str, ...] = ("tcp",)) -> None:
        """Send new connections to the service's IPv4 listen addresses to these backends, round robin in this
        order; with none, to nobody in the kernel (the activator's listener takes them). Connections from the
        `exempt` networks (its probers) always go to the activator's listener. One transaction. What is asked
        is remembered first, so a repair after a failure puts exactly this back."""
        self._backends[service] = list(backends)
        self._exempt[service] = tuple(str(n) for n in exempt if n.version == 4)
        cmds = []
        if service not in self._steered:
            chain = f"svc_{_ident(service)}"
            jumps = self._jumps(listen, chain, protocols)
            cmds += [f"add chain ip {self.table} {chain}",
                     *(f"add rule ip {self.table} {hook} {j}" for hook in ("prerouting", "output") for j in jumps)]
            self._steered[service] = jumps
        self.nft.run("\n".join(cmds + self._steer_rules(service)))

    def _steer_rules(self, service: str) -> list[str]:
        t, chain, backends = self.table, f"svc_{_ident(service)}", self._backends.get(service, [])
        cmds = [f"flush chain ip {t} {chain}"]
        if backends and (exempt := self._exempt.get(service)):
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
                cmds.append(f"add rule ip {t} {chain} {first} counter name steered_{_ident(service)} "
                            f"dnat ip to ct mark map {{ {targets} }}")
        return cmds

    # --- surviving the host's firewall tools (blocking) ----------------------------------------------------

    def firewall_intact(self) -> bool:
        """Are our two accepts still in iptables? A Docker restart or an `iptables -F` removes them."""
        return self.firewall.intact()

    def repair_firewall(self) -> None:
        self.firewall.open()


    def intact(self) -> bool:
        """Are both tables there? `nft flush ruleset` (a firewall reload, `systemctl reload nftables`,
        firewalld) or a hand-deleted table removes them under a running daemon. A listing costs ~1 ms."""
        try:
            tables = {(t["table"]["family"], t["table"]["name"]) for t in self.nft.query("list tables")
                      if "table" in t}
        except NftError:
            return False
        return not self.broken and {("ip", self.table), ("bridge", self.table)} <= tables

    def repair(self) -> None:
        """Put the tables back as they should be now: every plugged instance, limit, timeout and steering rule.
        Connections already steered keep going meanwhile (conntrack holds their translation and marks); the
        counters start again from zero."""
        with self._lock:
            self._install_table()
            cmds: list[str] = []
            for att in self._plugged.values():
                cmds += self._plug_rules(att)
            cmds.append(self._acct_rules())
            for service in self._limits:
                cmds += [f"add counter ip {self.table} rejected_{_ident(service)}",
                         f"add counter ip {self.table} steered_{_ident(service)}",
                         f"add counter ip {self.table} amplified_{_ident(service)}"]
            cmds += self._limit_rules()
            for service, jumps in self._steered.items():
                chain = f"svc_{_ident(service)}"
                cmds += [f"add chain ip {self.table} {chain}",
                         *(f"add rule ip {self.table} {hook} {j}" for hook in ("prerouting", "output") for j in jumps)]
                cmds += self._steer_rules(service)
            self.nft.run("\n".join(cmds))
            self.broken = False

    def sample(self) -> Samples:
        """Every plugged instance's kernel path, by mark: open connections (conntrack), packets and bytes; and
        each service's kernel-side max_connections rejections."""
        out: dict[int, Sample] = {}
        rejected: dict[str, int] = {}
        steered: dict[str, int] = {}
        amplified: dict[str, int] = {}
        try:
            counters = self.nft.query(f"list counters table ip {self.table}")
        except NftError:
            counters = []
        for item in counters:
            c = item.get("counter")
            if not c:
                continue
            name = str(c["name"])
            if name.startswith("rejected_"):
                rejected[name.removeprefix("rejected_")] = int(c["packets"])
            elif name.startswith("steered_"):
                steered[name.removeprefix("steered_")] = int(c["packets"])
            elif name.startswith("amplified_"):
                amplified[name.removeprefix("amplified_")] = int(c["packets"])
            elif name.startswith(("in_", "out_", "conns_")):
                mark = int(name.split("_", 1)[1], 16)
                s = out.setdefault(mark, Sample())
                if name.startswith("conns_"):
                    s.served = int(c["packets"])
                    continue
                s.packets += int(c["packets"])
                if name.startswith("in_"):
                    s.bytes_in = int(c["bytes"])
                else:
                    s.bytes_out = int(c["bytes"])
        for mark, (n, _half) in connections(self.mark_base).items():
            out.setdefault(mark, Sample()).open = n
        return Samples(out, rejected, steered, amplified)


def ident(name: str) -> str:
    """A service or bridge name as an nftables identifier."""
    return _ident(name)


def kernel_path_possible(config: ServiceConfig) -> bool:
    """Can this service's connections be steered in the kernel at all (whatever its app listens on)?"""
    return (config.network == "bridge" and config.proxy_protocol is None
            and any(ipaddress.ip_address(a.host).version == 4 for a in config.listen))


def connections(base: int) -> dict[int, tuple[int, int]]:
    """One daemon's kernel-path connections per instance mark: (open, half-open); egress ones are not counted.
    Read with conntrack.py (kernel-side mark filter, two attributes decoded): ~10 us an entry."""
    counts: dict[int, tuple[int, int]] = {}
    for raw_mark, state in conntrack.dump(base, MARK_MASK | EGRESS):
        mark = raw_mark & NOT_COUNTED
        n, half = counts.get(mark, (0, 0))
        # state None: a UDP flow, counted once the app has answered it (_acct_rules sets COUNTED then)
        if state in OPEN_TCP_STATES or (state is None and raw_mark & COUNTED):
            counts[mark] = (n + 1, half)
        elif state in HALF_OPEN_TCP_STATES:
            counts[mark] = (n, half + 1)
    return counts


def forget_udp_flow(client: tuple[str, int], listen_port: int) -> int:
    """Blocking. Delete the host's conntrack entries of one UDP flow to the activator's own socket (client ->
    listen port), so that the client's next datagram is a new flow (which the kernel path may DNAT). How many."""
    from pyroute2 import Conntrack
    from pyroute2.netlink.nfnetlink.nfctsocket import NFCTAttrTuple

    gone = 0
    if ":" in client[0]:
        return 0  # IPv6 flows are never steered in the kernel: nothing to make way for
    with Conntrack() as ct:
        want = NFCTAttrTuple(saddr=client[0], proto=socket.IPPROTO_UDP, sport=client[1], dport=listen_port)
        for entry in list(ct.dump_entries(tuple_orig=want)):
            with contextlib.suppress(Exception):
                ct.delete(entry)
                gone += 1
    return gone


def flush_conntrack(marks: Iterable[int], mask: int = 0xFFFFFFFF) -> None:
    from pyroute2 import Conntrack

    with Conntrack() as ct:
        for mark in marks:
            with contextlib.suppress(Exception):
                ct.flush(mark=mark, mark_mask=mask)


def _sysctl(path: str, value: str | None, *, missing_ok: bool = False) -> str | None:
    p = f"/proc/sys/{path}"
    if value is None:
        try:
            with open(p) as f:
                return f.read().strip()
        except OSError:
            return None
    try:
        with open(p, "w") as f:
            f.write(value)
    except FileNotFoundError:
        if missing_ok:  # e.g. IPv6 disabled on the kernel command line: nothing to turn off
            return None
        raise ActivatorError(f"cannot set {path.replace('/', '.')}={value}: no such setting") from None
    except OSError as e:
        raise ActivatorError(f"cannot set {path.replace('/', '.')}={value}: {e.strerror}") from None
    return value
