"""Which held request is a browser's page load (httpwait.py): a stranger's bytes, so anything partial or odd is
not, and the page names nothing of the request."""

from __future__ import annotations

import pytest

from activator.core.httpwait import HEAD_LIMIT, is_page_load, waiting_page


@pytest.mark.parametrize(("head", "expected"), [
    (b"GET / HTTP/1.1\r\nHost: x\r\nAccept: text/html,*/*\r\n\r\n", True),
    (b"GET /a HTTP/1.1\r\naccept:TEXT/HTML\r\n\r\nbody", True),
    (b"GET / HTTP/1.1\r\nHost: x\r\nAccept: */*\r\n\r\n", False),  # curl's default: an API client
    (b"POST / HTTP/1.1\r\nAccept: text/html\r\n\r\n", False),  # not idempotent: never answered for the app
    (b"GET / HTTP/1.1\r\nAccept: text/html\r\n", False),  # the head is not complete
    (b"GET / HTTP/1.1\r\nHost: x\r\n\r\nAccept: text/html\r\n\r\n", False),  # in the body, not the head
    (b"GET / HTTP/1.1\r\nX-Accept: text/html\r\n\r\n", False),
    (b"GET / HTTP/1.1\r\n" + b"X: " + b"a" * HEAD_LIMIT + b"\r\nAccept: text/html\r\n\r\n", False),  # too long
    (b"", False),
    (b"\x16\x03\x01\x02\x00", False),  # a TLS hello
])
def test_page_loads(head: bytes, expected: bool) -> None:
    assert is_page_load(head) is expected


def test_the_page_is_a_503_that_reloads_and_names_only_the_service() -> None:
    page = waiting_page("<web>", 2)
    head, _, body = page.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 503 ") and b"Retry-After: 2" in head and b"Cache-Control: no-store" in head
    assert int(head.split(b"Content-Length: ")[1]) == len(body)
    assert b"content=2" in body and b"&lt;web&gt;" in body and b"<web>" not in body
