"""The conntrack and packet marks of the kernel path: which daemon, which instance, egress or steered, counted.

One daemon's marks: the top twelve bits are a tag and this daemon's slot, chosen by HostNetwork.open() so that two
daemons on two bridges never count, flush or steer each other's connections (the slot is written in the table's
comment, where the next daemon reads it). Below them an instance's host index in the subnet, and two flags.
"""

from __future__ import annotations

MARK_TAG = 0xA0000000  # every activator's marks: 0xA, then an 8-bit daemon slot, the egress bit, the host index
MARK_MASK = 0xFFF00000  # one daemon's marks
SLOT_SHIFT = 20
EGRESS = 0x00080000  # within the host-index bits: a /16 has fewer than 2^19 hosts
#: set on a steered connection once it is counted as one the instance served (the first packet after its
#: handshake): a SYN that never completes is never counted
COUNTED = 0x00040000
INDEX_MASK = COUNTED - 1
NOT_COUNTED = 0xFFFFFFFF & ~COUNTED
#: a packet mark: "DNATed to an instance by a steering rule", set in the ip table's forward chain. With
#: br_netfilter on (Docker turns it on), a connection from one instance to a service address whose backend is
#: another instance is bridged port to port after the DNAT; the bridge table lets exactly those frames cross.
HAIRPIN = 0x00200000
