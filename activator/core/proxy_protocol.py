"""PROXY protocol headers (HAProxy's spec, v1 text and v2 binary), so an app behind us sees the client's address.

Only the sending side: the header is written to the backend before any client byte. Pure functions, no I/O.
"""

from __future__ import annotations

import ipaddress
import struct

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
_V2_PROXY = 0x21  # version 2, command PROXY
_V2_TCP4 = 0x11
_V2_TCP6 = 0x21

Address = tuple[str, int]


def _ips(src: Address, dst: Address) -> tuple[ipaddress.IPv4Address, ipaddress.IPv4Address] | tuple[
        ipaddress.IPv6Address, ipaddress.IPv6Address]:
    s, d = ipaddress.ip_address(src[0]), ipaddress.ip_address(dst[0])
    if isinstance(s, ipaddress.IPv6Address) and isinstance(d, ipaddress.IPv6Address):
        # A v4 client on a dual-stack listener shows up as ::ffff:a.b.c.d; apps expect it as v4.
        if s.ipv4_mapped is not None and d.ipv4_mapped is not None:
            return s.ipv4_mapped, d.ipv4_mapped
        return s, d
    if isinstance(s, ipaddress.IPv4Address) and isinstance(d, ipaddress.IPv4Address):
        return s, d
    raise ValueError(f"mixed address families: {src[0]} -> {dst[0]}")


def v1(src: Address, dst: Address) -> bytes:
    s, d = _ips(src, dst)
    proto = "TCP4" if s.version == 4 else "TCP6"
    return f"PROXY {proto} {s} {d} {src[1]} {dst[1]}\r\n".encode()


def v2(src: Address, dst: Address) -> bytes:
    s, d = _ips(src, dst)
    body = s.packed + d.packed + struct.pack("!HH", src[1], dst[1])
    fam = _V2_TCP4 if s.version == 4 else _V2_TCP6
    return V2_SIGNATURE + struct.pack("!BBH", _V2_PROXY, fam, len(body)) + body


def header(version: str, src: Address, dst: Address) -> bytes:
    return v1(src, dst) if version == "v1" else v2(src, dst)
