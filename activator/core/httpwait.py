"""HTTP-aware waiting (`http: true`): which held request is a browser's page load, and the small page that tells
it the service is starting and reloads itself.

The request's bytes are a stranger's: only the head already held is looked at (no read is made for it), at most
HEAD_LIMIT bytes of it, and a head that is not complete there is not a page load. Nothing of the request is echoed
into the page: it names the service (from the config) and nothing else."""

from __future__ import annotations

import html
import re

#: the part of a held request that is looked at
HEAD_LIMIT = 8192
_ACCEPT = re.compile(rb"^accept[ \t]*:[^\r\n]*text/html", re.IGNORECASE | re.MULTILINE)


def is_page_load(held: bytes) -> bool:
    """A GET whose complete head says it accepts text/html: a browser navigating, which a page that reloads
    itself serves better than a blank wait. Anything else (an API client, a POST, a partial head) keeps waiting
    for the instance."""
    head = held[:HEAD_LIMIT]
    end = head.find(b"\r\n\r\n")
    if end < 0 or not head.startswith(b"GET "):
        return False
    return _ACCEPT.search(head, 0, end) is not None


def waiting_page(service: str, retry_after: int) -> bytes:
    """A 503 with Retry-After whose body reloads itself after retry_after seconds; never cached."""
    name = html.escape(service)
    body = (f"<!doctype html><html><head><meta charset=utf-8><meta http-equiv=refresh content={retry_after}>"
            f"<title>Starting {name}</title></head><body style=\"font-family:sans-serif;margin:3em\">"
            f"<p>{name} is starting. This page reloads itself in {retry_after} s.</p></body></html>\n").encode()
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/html; charset=utf-8\r\n"
            f"Retry-After: {retry_after}\r\nCache-Control: no-store\r\nConnection: close\r\n"
            f"Content-Length: {len(body)}\r\n\r\n").encode()
    return head + body
