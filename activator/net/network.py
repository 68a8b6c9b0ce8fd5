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
- One daemon's marks (marks.py) are a tag and a slot chosen at open(), written in the table's comment.
- Half-open connections (SYN_SENT, SYN_RECV) of the kernel path time out after SYN_TIMEOUT seconds and do not
  count as open: a spoofed SYN flood can neither pin an instance nor scale a service out. A service's
  client_idle_timeout is its connections' conntrack idle timeout on the kernel path; when it expires the
  client's next segment is not steered (only a SYN is) and the host answers it with a reset.

Everything here is blocking (netlink, libnftables, iptables): callers run it in worker threads, except the
sub-millisecond steering updates (libnftables only). pyroute2 in particular must never be called on the event
loop's thread: its synchronous API then tries to open its netlink socket on the running (uvloop) loop, fails,
and leaves a handle behind that keeps the loop from closing.

This module owns the bridge, the addresses and what is installed (remembered, to repair it); the rule text is
rules.py (pure functions), the marks marks.py, an instance's place attachment.py, the reading of counters and
conntrack sampling.py. Their public names stay importable from here.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import re
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from activator.config.model import ListenAddress, NetworkSettings, ServiceConfig
from activator.errors import ActivatorError
from activator.statedir import in_use as statedir_in_use

from . import firewall, rules
from .attachment import VETH_PREFIX as VETH_PREFIX
from .attachment import Attachment as Attachment
from .attachment import mac_of as mac_of
from .conntrack import flush_conntrack as flush_conntrack
from .conntrack import forget_udp_flow as forget_udp_flow
from .firewall import FirewallHole
from .marks import COUNTED as COUNTED
from .marks import EGRESS as EGRESS
from .marks import HAIRPIN as HAIRPIN
from .marks import INDEX_MASK as INDEX_MASK
from .marks import MARK_MASK as MARK_MASK
from .marks import MARK_TAG as MARK_TAG
from .marks import NOT_COUNTED as NOT_COUNTED
from .marks import SLOT_SHIFT as SLOT_SHIFT
from .netns import HOME_NS, NetNamespace
from .nft import Nft, NftError, ifname
from .rules import AMPLIFY_STEPS as AMPLIFY_STEPS
from .rules import SYN_TIMEOUT as SYN_TIMEOUT
from .rules import UNANSWERED_TIMEOUT as UNANSWERED_TIMEOUT
from .rules import Backend as Backend
from .rules import ServiceLimits as ServiceLimits
from .rules import ident as ident
from .sampling import HALF_OPEN_TCP_STATES as HALF_OPEN_TCP_STATES
from .sampling import OPEN_TCP_STATES as OPEN_TCP_STATES
from .sampling import Sample as Sample
from .sampling import Samples as Samples
from .sampling import connections as connections
from .sampling import fold

log = logging.getLogger("activator.network")

#: the name tests/unit/test_writers.py and older callers know rules.ident by
_ident = ident


class HostNetwork:
    def __init__(self, settings: NetworkSettings, *, owner: Path, config_path: Path | None = None) -> None:
        ifname(settings.bridge)  # it goes into rule text and a table's name: refused here, before anything is made
        self.bridge = settings.bridge
        self.subnet = settings.subnet
        self.gateway = next(self.subnet.hosts())
        self.owner = str(owner)
        self.table = rules.table_name(self.bridge)
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
    def tables(self) -> rules.Table:
        """What the rule text needs to know of this daemon's tables, as they are now (open() picks the marks)."""
        return rules.Table(self.table, self.bridge, self.subnet, self.mark_base)

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
        for family in ("ip", "bridge"):
            with contextlib.suppress(NftError):
                self.nft.run(f"delete table {family} {self.table}")
        self.nft.run(rules.table_text(self.tables, firewall.docker_bridges()))

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
            self.nft.run("\n".join(rules.plug_rules(self.tables, att)) + "\n" + self._acct_rules())
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

    def unplug(self, att: Attachment) -> None:
        """Undo plug() and free the address; whatever is already gone is fine."""
        with IPRoute() as ipr, contextlib.suppress(Exception):
            for idx in ipr.link_lookup(ifname=att.veth):
                ipr.link("del", index=idx)
        m = att.mark
        with self._lock:
            self._plugged.pop(att.name, None)
            with contextlib.suppress(NftError):
                self.nft.run(self._acct_rules())
            for cmd in rules.unplug_rules(self.tables, att):
                with contextlib.suppress(NftError):
                    self.nft.run(cmd)
        flush_conntrack([m, m | EGRESS], mask=NOT_COUNTED)
        with self._lock:
            self._used.pop(att.index, None)

    def _acct_rules(self) -> str:
        return rules.acct_rules(self.tables, self._plugged.values())

    # --- steering -------------------------------------------------------------------------------------------

    def limit(self, service: str, listen: Iterable[ListenAddress], max_connections: int | None,
              client_idle_timeout: float | None = None, udp_flow_timeout: float | None = None,
              udp_reply_ratio: float = 3.0, handoff: bool = False) -> None:
        """The service's kernel-side counters, its max_connections enforced before DNAT on the listen address
        (one count for both paths, the kernel's and the activator's own listener), and its connections'
        conntrack timeouts (half-open: SYN_TIMEOUT; idle: client_idle_timeout). Installed at start, before any
        connection is accepted, so every one is counted."""
        self._limits[service] = ServiceLimits(tuple(listen), max_connections, client_idle_timeout, udp_flow_timeout,
                                              udp_reply_ratio, handoff)
        self.nft.run("\n".join([*rules.counter_rules(self.tables, service), *self._limit_rules()]))

    def _limit_rules(self) -> list[str]:
        return rules.limit_rules(self.tables, self._limits)

    def forget(self, service: str, *, counters: bool) -> None:
        """Take a service out of the kernel path entirely (a reload removed or redefined it): its jumps, its
        chain and its limit; its counters too when it is gone for good. Connections already DNATed keep going
        (conntrack holds their translation). Blocking."""
        lim = self._limits.pop(service, None)
        had_chain = self._steered.pop(service, None) is not None
        self.nft.run("\n".join(rules.forget_rules(
            self.tables, service, steered=self._steered, limits=self._limits,
            udp=lim is not None and lim.udp_flow_timeout is not None, chain=had_chain, counters=counters)))

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
            jumps = rules.jumps(listen, rules.steer_chain(service), protocols)
            cmds += rules.steer_chain_rules(self.tables, service, jumps)
            self._steered[service] = jumps
        self.nft.run("\n".join(cmds + self._steer_rules(service)))

    def _steer_rules(self, service: str) -> list[str]:
        return rules.steer_rules(self.tables, service, self._backends.get(service, []), self._exempt.get(service, ()))

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
                cmds += rules.plug_rules(self.tables, att)
            cmds.append(self._acct_rules())
            for service in self._limits:
                cmds += rules.counter_rules(self.tables, service)
            cmds += self._limit_rules()
            for service, jumps in self._steered.items():
                cmds += rules.steer_chain_rules(self.tables, service, jumps)
                cmds += self._steer_rules(service)
            self.nft.run("\n".join(cmds))
            self.broken = False

    def sample(self) -> Samples:
        """Every plugged instance's kernel path, by mark: open connections (conntrack), packets and bytes; and
        each service's kernel-side max_connections rejections."""
        try:
            counters = self.nft.query(f"list counters table ip {self.table}")
        except NftError:
            counters = []
        return fold(counters, connections(self.mark_base))

def kernel_path_possible(config: ServiceConfig) -> bool:
    """Can this service's connections be steered in the kernel at all (whatever its app listens on)?"""
    return (config.network == "bridge" and config.proxy_protocol is None
            and any(ipaddress.ip_address(a.host).version == 4 for a in config.listen))


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
