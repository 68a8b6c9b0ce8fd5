"""Instance networking, host side: a bridge and a subnet owned by this activator, a veth per instance, and one
nftables table that gives instances outbound access and steers clients to them in the kernel.

    client ──> host address:port ──nat (output / prerouting)──> svc chain: DNAT to a live instance (round robin,
                                                               ct mark = the instance's), or nothing (no
                                                               instance: the activator's own listener gets it)
    instance eth0 (10.89.0.N) ──veth──> bridge (10.89.0.1, the gateway) ──forward + masquerade──> the world

- Addresses: the subnet's first address is the bridge's; instances get the lowest free one. Allocation is in
  memory: no instance outlives its daemon (a crashed run's are removed before anything is allocated), so no
  two live instances can share one.
- Marks: every connection steered to an instance carries the conntrack mark MARK_BASE | host index, which is
  how the activator counts an instance's kernel-path connections (a conntrack dump filtered by mark in the
  kernel) and removes their entries when it goes. Its own outbound connections carry EGRESS | host index
  instead: they do not keep it alive, and they are flushed with it too.
- Loopback clients: DNAT of 127.0.0.1 to the bridge needs route_localnet, which is enabled on the bridge only,
  never host-wide (CVE-2020-8558), and such connections are masqueraded, so the app sees the bridge's address
  (10.89.0.1). Remote clients keep their own address.
- Docker sets the FORWARD policy to DROP, and a drop in any base chain wins over an accept in ours. Forwarded
  traffic to and from the bridge is therefore accepted in Docker's DOCKER-USER chain (or in FORWARD itself when
  its policy is DROP without Docker), with rules tagged by a comment so they are found and removed again.
- Instances are reachable only through the steering rules: new connections into the bridge that were not
  DNATed are dropped. `egress: false` instances may not open connections (new connections from their address
  are dropped in forward and input), but answer the ones steered to them.

Everything here is blocking (netlink, libnftables, iptables): callers run it in worker threads, except the
sub-millisecond steering updates (libnftables only). pyroute2 in particular must never be called on the event
loop's thread: its synchronous API then tries to open its netlink socket on the running (uvloop) loop, fails,
and leaves a handle behind that keeps the loop from closing.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import logging
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from pyroute2 import IPRoute
from pyroute2 import netns as pyroute2_netns

from .config import ListenAddress, NetworkSettings, ServiceConfig
from .errors import ActivatorError
from .netns import HOME_NS, NetNamespace
from .nft import Nft, NftError
from .statedir import in_use as statedir_in_use

if TYPE_CHECKING:
    from .instance import Instance

log = logging.getLogger("activator.network")

MARK_BASE = 0xAC700000
MARK_MASK = 0xFFF00000
EGRESS = 0x00080000  # within the host-index bits: a /16 has fewer than 2^19 hosts
INDEX_MASK = EGRESS - 1
VETH_PREFIX = "av"
#: conntrack TCP states that are a connection still in use (SYN_SENT .. LAST_ACK); TIME_WAIT/CLOSE are over
OPEN_TCP_STATES = frozenset(range(1, 7)) | {9}
FIREWALL_TAG = "activator"


@dataclass(frozen=True)
class Attachment:
    """One instance's (or template's) place on the network."""

    name: str
    ip: ipaddress.IPv4Address
    index: int  # host index in the subnet
    egress: bool

    @property
    def mark(self) -> int:
        return MARK_BASE | self.index

    @property
    def veth(self) -> str:
        return VETH_PREFIX + hashlib.sha1(self.name.encode()).hexdigest()[:10]


@dataclass(frozen=True)
class Backend:
    ip: ipaddress.IPv4Address
    port: int
    mark: int


@dataclass
class Sample:
    """One instance's kernel path, as of the last look: open connections and traffic counters."""

    open: int = 0
    packets: int = 0
    bytes_in: int = 0
    bytes_out: int = 0


@dataclass
class Samples:
    by_mark: dict[int, Sample]
    rejected: dict[str, int]  # connections refused for max_connections, by service
    steered: dict[str, int]  # new connections sent to an instance, by service


def _ident(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_]", "_", name)


class HostNetwork:
    def __init__(self, settings: NetworkSettings, *, owner: Path, config_path: Path | None = None) -> None:
        self.bridge = settings.bridge
        self.subnet = settings.subnet
        self.gateway = next(self.subnet.hosts())
        self.owner = str(owner)
        self.table = f"activator_{_ident(self.bridge)}"
        self.where = f"{config_path}: settings.network" if config_path else "settings.network"
        self._lock = threading.Lock()
        self._used: dict[int, str] = {}
        self._steered: dict[str, list[str]] = {}  # service -> its chain's jump rules, installed once
        self._limits: dict[str, tuple[tuple[ListenAddress, ...], int | None]] = {}  # service -> listen, limit
        self._nft: Nft | None = None
        self._plugged: dict[str, Attachment] = {}

    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    # --- lifecycle (blocking) -------------------------------------------------------------------------------

    def open(self) -> None:
        """Check the subnet and the bridge name, then make the bridge, the sysctls, the table, the firewall hole."""
        self.nft  # noqa: B018 - a missing libnftables is a one-line error before anything is made
        with IPRoute() as ipr:
            self._check_subnet(ipr)
            idx = self._ensure_bridge(ipr)
            for addr in ipr.get_addr(index=idx, family=2):
                if addr.get_attr("IFA_ADDRESS") != str(self.gateway):
                    ipr.addr("del", index=idx, address=addr.get_attr("IFA_ADDRESS"), prefixlen=addr["prefixlen"])
            with contextlib.suppress(Exception):  # already there from a previous run
                ipr.addr("add", index=idx, address=str(self.gateway), prefixlen=self.subnet.prefixlen)
            ipr.link("set", index=idx, state="up")
            self._bridge_index = idx
        _sysctl(f"net/ipv4/conf/{self.bridge}/route_localnet", "1")  # on our bridge only (CVE-2020-8558)
        if _sysctl("net/ipv4/ip_forward", None) != "1":
            log.warning("enabling net.ipv4.ip_forward: instances need it to reach anything beyond the host")
            _sysctl("net/ipv4/ip_forward", "1")
        self._install_table()
        flush_conntrack([MARK_BASE], mask=MARK_MASK)  # a dead run's entries would count against new instances
        self._open_firewall()

    def close(self) -> None:
        """Undo open(): the table, the firewall rules, the bridge."""
        with contextlib.suppress(NftError):
            self.nft.run(f"delete table ip {self.table}")
        _close_firewall(self.bridge)
        flush_conntrack([MARK_BASE], mask=MARK_MASK)
        with IPRoute() as ipr, contextlib.suppress(Exception):
            for idx in ipr.link_lookup(ifname=self.bridge):
                if self._owned(ipr, idx):
                    ipr.link("del", index=idx)
        if self._nft is not None:
            self._nft.close()
            self._nft = None

    def remove_leftovers(self) -> list[str]:
        """What a crashed run left that the next open() would not replace: our veths still on the bridge, the
        steering table (a dead daemon's rules keep steering to instances that are about to be removed)."""
        found: list[str] = []
        with contextlib.suppress(NftError):
            if any(t.get("table", {}).get("name") == self.table for t in self.nft.query("list tables ip")):
                self.nft.run(f"delete table ip {self.table}")
                found.append(f"nftables table ip {self.table}")
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

    def _ensure_bridge(self, ipr: IPRoute) -> int:
        found = ipr.link_lookup(ifname=self.bridge)
        if found:
            (link,) = ipr.get_links(found[0])
            info = link.get_attr("IFLA_LINKINFO")
            kind = info.get_attr("IFLA_INFO_KIND") if info else None
            alias = link.get_attr("IFLA_IFALIAS")
            if kind != "bridge" or not self._owned(ipr, found[0]):
                what = f"a {kind or 'network'} interface" + (f" ({alias})" if alias else "")
                raise ActivatorError(f"{self.where}.bridge: '{self.bridge}' is already {what} that this activator "
                                     "did not make; set settings.network.bridge to a free name")
            return int(found[0])
        try:
            ipr.link("add", ifname=self.bridge, kind="bridge")
        except Exception as e:
            raise ActivatorError(f"{self.where}.bridge: cannot create bridge '{self.bridge}': {e}") from None
        idx = int(ipr.link_lookup(ifname=self.bridge)[0])
        ipr.link("set", index=idx, ifalias=self._alias())
        return idx

    def _install_table(self) -> None:
        br, net, t = self.bridge, self.subnet, self.table
        with contextlib.suppress(NftError):
            self.nft.run(f"delete table ip {t}")
        self.nft.run(f"""
table ip {t} {{
    set noegress {{ type ipv4_addr; }}
    map egress_marks {{ type ipv4_addr : mark; }}
    chain prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}
    chain output {{ type nat hook output priority -100; policy accept; }}
    chain limit_in {{ type filter hook prerouting priority mangle; policy accept; }}
    chain limit_out {{ type filter hook output priority mangle; policy accept; }}
    chain postrouting {{
        type nat hook postrouting priority srcnat; policy accept;
        ip saddr 127.0.0.0/8 oifname "{br}" masquerade
        ip saddr {net} oifname != "{br}" masquerade
        ip saddr {net} ip daddr {net} ct status dnat masquerade
    }}
    chain mark_egress {{
        type filter hook prerouting priority mangle; policy accept;
        iifname "{br}" ct state new ct mark set ip saddr map @egress_marks
    }}
    chain forward {{
        type filter hook forward priority filter; policy accept;
        iifname "{br}" ip saddr @noegress ct state new drop
        oifname "{br}" ct state new ct status dnat accept
        oifname "{br}" ct state new drop
        jump acct
    }}
    chain input {{
        type filter hook input priority filter; policy accept;
        iifname "{br}" ip saddr @noegress ct state new drop
        jump acct
    }}
    chain acct_out {{ type filter hook output priority filter; policy accept; jump acct; }}
    chain acct {{ }}
}}""")

    def _open_firewall(self) -> None:
        if shutil.which("iptables") is None:
            return
        _close_firewall(self.bridge)  # a previous run's, if any: exactly one set of ours
        chain = "DOCKER-USER" if _iptables("-S", "DOCKER-USER").returncode == 0 else None
        if chain is None and "-P FORWARD DROP" in _iptables("-S", "FORWARD").stdout:
            chain = "FORWARD"
        if chain is None:
            return
        tag = ["-m", "comment", "--comment", f"{FIREWALL_TAG} {self.bridge}"]
        for rule in (["-i", self.bridge, *tag, "-j", "ACCEPT"],
                     ["-o", self.bridge, "-m", "conntrack", "--ctstate", "RELATED,ESTABLISHED,DNAT", *tag,
                      "-j", "ACCEPT"]):
            out = _iptables("-I", chain, *rule)
            if out.returncode != 0:
                raise ActivatorError(f"cannot let instance traffic through the host firewall ({chain}): "
                                     f"{out.stderr.strip()[:200]}")
        log.info("instance traffic accepted in iptables %s (the FORWARD policy is DROP)", chain)

    # --- instances (blocking) -------------------------------------------------------------------------------

    def allocate(self, name: str, egress: bool) -> Attachment:
        with self._lock:
            hosts = self.subnet.num_addresses - 2
            for index in range(2, hosts + 1):
                if index not in self._used:
                    self._used[index] = name
                    return Attachment(name, self.subnet.network_address + index, index, egress)
        raise ActivatorError(f"{self.where}.subnet: {self.subnet} has no free address left for '{name}'; use a "
                             "larger subnet")

    def plug(self, att: Attachment, ns: NetNamespace) -> None:
        """The instance's eth0, made directly inside its namespace (moving a veth between namespaces is slow
        under the rtnl lock), on the bridge, addressed, with a default route; its rules in the table."""
        with IPRoute() as ipr:
            ipr.link("add", ifname=att.veth, kind="veth", peer={"ifname": "eth0", "net_ns_fd": ns.fd})
            (idx,) = ipr.link_lookup(ifname=att.veth)
            ipr.link("set", index=idx, master=self._bridge_index, state="up")
        pyroute2_netns.setns(ns.fd)
        try:
            with IPRoute() as inner:
                (eth0,) = inner.link_lookup(ifname="eth0")
                inner.addr("add", index=eth0, address=str(att.ip), prefixlen=self.subnet.prefixlen)
                inner.link("set", index=eth0, state="up")
                inner.route("add", dst="default", gateway=str(self.gateway))
        finally:
            pyroute2_netns.setns(HOME_NS)
        t, m = self.table, att.mark
        cmds = [f"add counter ip {t} in_{m:x}", f"add counter ip {t} out_{m:x}",
                f"add element ip {t} egress_marks {{ {att.ip} : {m | EGRESS:#x} }}"]
        if not att.egress:
            cmds.append(f"add element ip {t} noegress {{ {att.ip} }}")
        with self._lock:
            self._plugged[att.name] = att
            self.nft.run("\n".join(cmds) + "\n" + self._acct_rules())

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
                        f"delete element ip {t} egress_marks {{ {att.ip} }}",
                        f"delete element ip {t} noegress {{ {att.ip} }}"):
                with contextlib.suppress(NftError):
                    self.nft.run(cmd)
        flush_conntrack([m, m | EGRESS])
        with self._lock:
            self._used.pop(att.index, None)

    def _acct_rules(self) -> str:
        """The accounting chain, rebuilt whole (one transaction with whatever else is changing)."""
        t = self.table
        rules = [f"flush chain ip {t} acct"]
        for att in self._plugged.values():
            m = att.mark
            rules.append(f"add rule ip {t} acct ct mark {m:#x} ct direction original counter name in_{m:x}")
            rules.append(f"add rule ip {t} acct ct mark {m:#x} ct direction reply counter name out_{m:x}")
        return "\n".join(rules)

    # --- steering -------------------------------------------------------------------------------------------

    def _jumps(self, listen: Iterable[ListenAddress], chain: str) -> list[str]:
        jumps = []
        for addr in listen:
            ip = ipaddress.ip_address(addr.host)
            if ip.version != 4:
                continue  # IPv6 listen addresses stay on the userspace path (see docs/architecture.md)
            match = "fib daddr type local" if ip.is_unspecified else f"ip daddr {ip}"
            jumps.append(f"{match} tcp dport {addr.port} jump {chain}")
        return jumps

    def limit(self, service: str, listen: Iterable[ListenAddress], max_connections: int | None) -> None:
        """The service's kernel-side counters, and its max_connections enforced before DNAT on the listen
        address: one count for both paths, the kernel's and the activator's own listener. Installed at start,
        before any connection is accepted, so every one is counted."""
        name = _ident(service)
        self._limits[service] = (tuple(listen), max_connections)
        self.nft.run("\n".join([f"add counter ip {self.table} rejected_{name}",
                                f"add counter ip {self.table} steered_{name}", *self._limit_rules()]))

    def _limit_rules(self) -> list[str]:
        """Both limit chains, rebuilt whole (a reload changes one service's limit without touching others)."""
        t = self.table
        cmds = [f"flush chain ip {t} limit_in", f"flush chain ip {t} limit_out"]
        for service, (listen, max_connections) in self._limits.items():
            if max_connections is None:
                continue
            reject = (f"ct state new ct count over {max_connections} counter name rejected_{_ident(service)} "
                      "reject with tcp reset")
            for rule in self._jumps(listen, "-"):
                match = rule.rsplit(" jump ", 1)[0]
                cmds += [f"add rule ip {t} limit_in {match} {reject}", f"add rule ip {t} limit_out {match} {reject}"]
        return cmds

    def forget(self, service: str, *, counters: bool) -> None:
        """Take a service out of the kernel path entirely (a reload removed or redefined it): its jumps, its
        chain and its limit; its counters too when it is gone for good. Connections already DNATed keep going
        (conntrack holds their translation). Blocking."""
        t, name = self.table, _ident(service)
        self._limits.pop(service, None)
        had_chain = self._steered.pop(service, None) is not None
        cmds = [f"flush chain ip {t} prerouting", f"flush chain ip {t} output"]
        for jumps in self._steered.values():
            cmds += [f"add rule ip {t} {hook} {j}" for hook in ("prerouting", "output") for j in jumps]
        cmds += self._limit_rules()
        if had_chain:
            cmds += [f"flush chain ip {t} svc_{name}", f"delete chain ip {t} svc_{name}"]
        if counters:
            cmds += [f"delete counter ip {t} rejected_{name}", f"delete counter ip {t} steered_{name}"]
        self.nft.run("\n".join(cmds))

    def steer(self, service: str, listen: Iterable[ListenAddress], backends: list[Backend]) -> None:
        """Send new connections to the service's IPv4 listen addresses to these backends, round robin; with
        none, to nobody in the kernel (the activator's listener takes them). One transaction."""
        t, chain = self.table, f"svc_{_ident(service)}"
        cmds = []
        if service not in self._steered:
            cmds.append(f"add chain ip {t} {chain}")
            jumps = self._jumps(listen, chain)
            for hook in ("prerouting", "output"):
                cmds += [f"add rule ip {t} {hook} {j}" for j in jumps]
            self._steered[service] = jumps
        cmds.append(f"flush chain ip {t} {chain}")
        if backends:
            marks = ", ".join(f"{i} : {b.mark:#x}" for i, b in enumerate(backends))
            targets = ", ".join(f"{b.mark:#x} : {b.ip} . {b.port}" for b in backends)
            cmds.append(f"add rule ip {t} {chain} meta l4proto tcp ct mark set numgen inc mod {len(backends)} "
                        f"map {{ {marks} }}")
            cmds.append(f"add rule ip {t} {chain} meta l4proto tcp counter name steered_{_ident(service)} "
                        f"dnat ip to ct mark map {{ {targets} }}")
        self.nft.run("\n".join(cmds))

    # --- measuring (blocking) -------------------------------------------------------------------------------

    def sample(self) -> Samples:
        """Every plugged instance's kernel path, by mark: open connections (conntrack), packets and bytes; and
        each service's kernel-side max_connections rejections."""
        out: dict[int, Sample] = {}
        rejected: dict[str, int] = {}
        steered: dict[str, int] = {}
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
            elif name.startswith(("in_", "out_")):
                mark = int(name.split("_", 1)[1], 16)
                s = out.setdefault(mark, Sample())
                s.packets += int(c["packets"])
                if name.startswith("in_"):
                    s.bytes_in = int(c["bytes"])
                else:
                    s.bytes_out = int(c["bytes"])
        for mark, n in open_connections().items():
            out.setdefault(mark, Sample()).open = n
        return Samples(out, rejected, steered)


class ServiceSteering:
    """One service's kernel path: its rule lists exactly the instances Service says are steerable."""

    def __init__(self, network: HostNetwork, config: ServiceConfig) -> None:
        self.network = network
        self.config = config

    def set(self, instances: list[Instance]) -> None:
        backends = [Backend(att.ip, self.config.port, att.mark) for i in instances
                    if (att := i.sandbox.attachment) is not None]
        self.network.steer(self.config.name, self.config.listen, backends)

    def open_count(self, inst: Instance) -> int:
        att = inst.sandbox.attachment
        return 0 if att is None else open_connections().get(att.mark, 0)


def ident(name: str) -> str:
    """A service or bridge name as an nftables identifier."""
    return _ident(name)


def kernel_path_possible(config: ServiceConfig) -> bool:
    """Can this service's connections be steered in the kernel at all (whatever its app listens on)?"""
    return (config.network == "bridge" and config.proxy_protocol is None
            and any(ipaddress.ip_address(a.host).version == 4 for a in config.listen))


def open_connections() -> dict[int, int]:
    """Open kernel-path connections per instance mark (egress ones are not counted)."""
    from pyroute2 import Conntrack

    counts: dict[int, int] = {}
    with Conntrack() as ct:
        for e in ct.dump_entries(mark=MARK_BASE, mark_mask=MARK_MASK | EGRESS):
            state = e.protoinfo.state if e.protoinfo is not None else None
            if state in OPEN_TCP_STATES:
                counts[e.mark] = counts.get(e.mark, 0) + 1
    return counts


def flush_conntrack(marks: Iterable[int], mask: int = 0xFFFFFFFF) -> None:
    from pyroute2 import Conntrack

    with Conntrack() as ct:
        for mark in marks:
            with contextlib.suppress(Exception):
                ct.flush(mark=mark, mark_mask=mask)


def _sysctl(path: str, value: str | None) -> str | None:
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
    except OSError as e:
        raise ActivatorError(f"cannot set {path.replace('/', '.')}={value}: {e.strerror}") from None
    return value


def _iptables(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["iptables", "-w", "5", *args], capture_output=True, text=True, timeout=30,
                          env={**os.environ, "LC_ALL": "C"})


def _close_firewall(bridge: str) -> None:
    """Remove the rules _open_firewall() put into iptables (found by their comment), highest number first."""
    if shutil.which("iptables") is None:
        return
    tag = f"/* {FIREWALL_TAG} {bridge} */"
    for chain in ("DOCKER-USER", "FORWARD"):
        listing = _iptables("-L", chain, "-n", "--line-numbers")
        if listing.returncode != 0:
            continue
        numbers = [int(line.split()[0]) for line in listing.stdout.splitlines()
                   if tag in line and line.split() and line.split()[0].isdigit()]
        for n in sorted(numbers, reverse=True):
            _iptables("-D", chain, str(n))
