"""Counting one daemon's conntrack entries, by mark and TCP state, fast enough to do four times a second; and
removing entries (by mark, or one UDP flow) through pyroute2, where speed does not matter.

pyroute2's Conntrack decodes every attribute of every entry into Python objects: ~400 us an entry here, so a
5,000-connection flood made each sample take two seconds of the daemon's GIL (and /metrics, the reaper and every
helper thread waited behind it). This asks ctnetlink for the entries whose mark matches (filtered in the kernel)
and reads only the two attributes it needs, CTA_MARK and the TCP state, straight from the bytes.
"""

from __future__ import annotations

import contextlib
import os
import socket
import struct
from collections.abc import Iterable, Iterator

NETLINK_NETFILTER = 12
NFNL_SUBSYS_CTNETLINK = 1
IPCTNL_MSG_CT_GET = 1
NLM_F_REQUEST, NLM_F_DUMP = 0x1, 0x300
NLMSG_ERROR, NLMSG_DONE = 2, 3
CTA_PROTOINFO, CTA_MARK, CTA_MARK_MASK = 4, 8, 21
CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE = 1, 1
NLA_TYPE_MASK = 0x3FFF

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NLA = struct.Struct("=HH")  # nlattr: len, type


def _attrs(buf: bytes, start: int, end: int) -> Iterator[tuple[int, int, int]]:
    """(type, payload start, payload end) of each attribute in buf[start:end]."""
    while start + 4 <= end:
        length, kind = _NLA.unpack_from(buf, start)
        if length < 4:
            return
        yield kind & NLA_TYPE_MASK, start + 4, start + length
        start += (length + 3) & ~3


def _entry(buf: bytes, start: int, end: int) -> tuple[int, int | None]:
    """An entry's mark and TCP state (None for another protocol) from its attributes."""
    mark, state = 0, None
    for kind, a, b in _attrs(buf, start, end):
        if kind == CTA_MARK:
            mark = struct.unpack_from(">I", buf, a)[0]
        elif kind == CTA_PROTOINFO:
            for k2, a2, b2 in _attrs(buf, a, b):
                if k2 == CTA_PROTOINFO_TCP:
                    for k3, a3, _ in _attrs(buf, a2, b2):
                        if k3 == CTA_PROTOINFO_TCP_STATE:
                            state = buf[a3]
    return mark, state


def dump(mark: int, mask: int) -> list[tuple[int, int | None]]:
    """(mark, TCP state) of every IPv4 conntrack entry whose mark & mask == mark. Blocking; raises OSError."""
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
        attrs = (_NLA.pack(8, CTA_MARK) + struct.pack(">I", mark) + _NLA.pack(8, CTA_MARK_MASK)
                 + struct.pack(">I", mask))
        body = struct.pack("=BBH", socket.AF_INET, 0, 0) + attrs
        msg_type = (NFNL_SUBSYS_CTNETLINK << 8) | IPCTNL_MSG_CT_GET
        s.send(_HDR.pack(_HDR.size + len(body), msg_type, NLM_F_REQUEST | NLM_F_DUMP, 1, 0) + body)
        out: list[tuple[int, int | None]] = []
        while True:
            buf = s.recv(1 << 16)
            pos = 0
            while pos + _HDR.size <= len(buf):
                length, kind, _flags, _seq, _pid = _HDR.unpack_from(buf, pos)
                if length < _HDR.size:
                    return out
                if kind == NLMSG_DONE:
                    return out
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", buf, pos + _HDR.size)[0]
                    if code:
                        raise OSError(code, os.strerror(code))
                    return out
                out.append(_entry(buf, pos + _HDR.size + 4, pos + length))  # past nfgenmsg
                pos += (length + 3) & ~3


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

