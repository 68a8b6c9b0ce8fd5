"""One instance's (or template's) place on the bridge: its address, host index, mark, veth and MAC, all derived
from values known before any link exists (the bridge table lists a port and its sources before it is made)."""

from __future__ import annotations

import hashlib
import ipaddress
from dataclasses import dataclass

VETH_PREFIX = "av"


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
