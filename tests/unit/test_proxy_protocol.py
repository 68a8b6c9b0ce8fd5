"""PROXY protocol v1/v2 toward the app: the header bytes (pure), and the header reaching a real restored app
before any client byte (the spoofing race is in test_splice.py)."""

from __future__ import annotations

import ipaddress
import struct

from activator.core import proxy_protocol


def test_proxy_v1() -> None:
    assert proxy_protocol.v1(("10.0.0.1", 5555), ("127.0.0.1", 80)) == b"PROXY TCP4 10.0.0.1 127.0.0.1 5555 80\r\n"
    assert proxy_protocol.v1(("::1", 1), ("::1", 2)) == b"PROXY TCP6 ::1 ::1 1 2\r\n"
    # A v4 client on a dual-stack listener is reported as v4.
    assert proxy_protocol.v1(("::ffff:10.1.2.3", 7), ("::ffff:127.0.0.1", 8)).startswith(b"PROXY TCP4 10.1.2.3 ")


def test_proxy_v2_layout() -> None:
    h = proxy_protocol.v2(("10.0.0.1", 5555), ("127.0.0.1", 80))
    assert h[:12] == proxy_protocol.V2_SIGNATURE
    ver_cmd, fam, length = struct.unpack("!BBH", h[12:16])
    assert (ver_cmd, fam, length) == (0x21, 0x11, 12) and len(h) == 16 + 12
    src, dst = ipaddress.ip_address(h[16:20]), ipaddress.ip_address(h[20:24])
    assert (str(src), str(dst), struct.unpack("!HH", h[24:28])) == ("10.0.0.1", "127.0.0.1", (5555, 80))
    h6 = proxy_protocol.v2(("::1", 1), ("::2", 2))
    assert h6[13] == 0x21 and struct.unpack("!H", h6[14:16])[0] == 36 and len(h6) == 16 + 36



