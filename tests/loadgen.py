"""A load generator run as its own process (its own event loop, not the activator's): many concurrent clients
that each send a payload and read the whole answer. Prints a JSON summary on stdout.

    python -m tests.loadgen PORT --connections N --concurrency C --fin-every K [--spoof] [--header-of V]

Every client sends `PROXY TCP4 6.6.6.6 6.6.6.6 1 2\\r\\n` first when --spoof is given (a client trying to pass
itself off), then a payload unique to it; every K-th client shuts its write side down right after sending (like
`printf ... | nc -N`), the others after reading the echo. The expected answer is exactly what the app read: the
real PROXY header for this client's address (--header-of v1|v2), then the client's bytes, in order.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from activator.core import proxy_protocol

SPOOF = b"PROXY TCP4 6.6.6.6 6.6.6.6 1 2\r\n"


async def one(port: int, i: int, fin_early: bool, spoof: bool, header: str | None, result: dict[str, list[str]]
              ) -> None:
    loop = asyncio.get_running_loop()
    s = socket.socket()
    s.setblocking(False)
    payload = (SPOOF if spoof else b"") + b"client %d says %s\n" % (i, os.urandom(8).hex().encode())
    try:
        await asyncio.wait_for(loop.sock_connect(s, ("127.0.0.1", port)), 30)
        me = s.getsockname()[:2]
        expected = (proxy_protocol.header(header, me, ("127.0.0.1", port)) if header else b"") + payload
        await loop.sock_sendall(s, payload)
        if fin_early:
            s.shutdown(socket.SHUT_WR)
        got = b""
        deadline = time.monotonic() + 30
        while len(got) < len(expected) and time.monotonic() < deadline:
            chunk = await asyncio.wait_for(loop.sock_recv(s, 65536), max(0.01, deadline - time.monotonic()))
            if not chunk:
                break
            got += chunk
        if not fin_early:
            s.shutdown(socket.SHUT_WR)
        while chunk := await asyncio.wait_for(loop.sock_recv(s, 65536), 30):
            got += chunk
    except (OSError, TimeoutError) as e:
        result["errors"].append(f"{i}: {type(e).__name__} {e}")
        return
    finally:
        s.close()
    if got == expected:
        result["ok"].append(str(i))
    elif not got:
        result["empty"].append(str(i))
    elif got.startswith(SPOOF) or (header and not got.startswith(expected[:12])):
        result["spoofed"].append(f"{i}: {got[:60]!r}")
    else:
        result["wrong"].append(f"{i}: expected {expected[:60]!r}, got {got[:60]!r}")


async def main(args: argparse.Namespace) -> dict[str, list[str]]:
    result: dict[str, list[str]] = {"ok": [], "empty": [], "spoofed": [], "wrong": [], "errors": []}
    for start in range(0, args.connections, args.concurrency):
        batch = range(start, min(args.connections, start + args.concurrency))
        await asyncio.gather(*(one(args.port, i, i % args.fin_every == 0, args.spoof, args.header_of, result)
                               for i in batch))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("port", type=int)
    p.add_argument("--connections", type=int, default=1000)
    p.add_argument("--concurrency", type=int, default=100)
    p.add_argument("--fin-every", type=int, default=2)
    p.add_argument("--spoof", action="store_true")
    p.add_argument("--header-of", choices=["v1", "v2"])
    r = asyncio.run(main(p.parse_args()))
    print(json.dumps({k: (v if k != "ok" else len(v)) for k, v in r.items()}))
