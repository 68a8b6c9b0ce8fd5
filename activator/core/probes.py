"""Health checks answered by the activator (`probes:`): what a held request asks, which probe it is, and the
answer to give, recorded from the template at build time or taken from a running instance just now.

Both the request (a prober's, or a stranger's from a prober's network) and the answers (the image's app) are
untrusted: only a complete head within HEAD_LIMIT is looked at, answers are cut to BODY_LIMIT, and what is sent
back is rebuilt from the status, the content type and the body alone, so neither side can smuggle a header or a
second response through the activator."""

from __future__ import annotations

import base64
import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from activator.config.probes import Probe

#: the part of a held request that is looked at
HEAD_LIMIT = 8192
#: the most of an answer's body that is kept and sent
BODY_LIMIT = 16384
#: the most of an app's whole answer that is read
ANSWER_LIMIT = HEAD_LIMIT + BODY_LIMIT
_REQUEST_LINE = re.compile(rb"(GET|HEAD) ([\x21-\x7e]{1,1000}) HTTP/1\.[01]")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: ([\x20-\x7e]*))?")
_PRINTABLE = re.compile(r"[^\x20-\x7e]")

Address = ipaddress.IPv4Address | ipaddress.IPv6Address


@dataclass(frozen=True)
class Answer:
    """An HTTP answer, as much of it as a probe needs."""

    status: int
    reason: str
    content_type: str
    body: bytes

    def to_json(self) -> dict[str, Any]:
        return {"status": self.status, "reason": self.reason, "content_type": self.content_type,
                "body": base64.b64encode(self.body).decode()}

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Answer:
        return cls(int(d["status"]), str(d["reason"]), str(d["content_type"]), base64.b64decode(d["body"]))

    @classmethod
    def from_untrusted(cls, d: Any) -> Answer:
        """An answer recorded on another host (an imported checkpoint): rebuilt within the bounds parse_answer
        keeps, so it cannot split the head it is rendered into or grow past BODY_LIMIT. ValueError if unusable."""
        if not isinstance(d, dict) or not isinstance(d.get("body"), str) or len(d["body"]) > 2 * BODY_LIMIT:
            raise ValueError("not a recorded answer")
        status = d.get("status")
        if not isinstance(status, int) or not 100 <= status <= 599:
            raise ValueError("status out of range")
        return cls(status, _clean(str(d.get("reason", "")))[:100], _clean(str(d.get("content_type", "")))[:200],
                   base64.b64decode(d["body"], validate=True)[:BODY_LIMIT])


UNAVAILABLE = Answer(503, "Service Unavailable", "text/plain", b"service unavailable\n")


def request(held: bytes) -> tuple[str, str] | None:
    """(method, request-target) of a complete GET or HEAD head, else None (anything else is not a probe)."""
    head = held[:HEAD_LIMIT]
    end = head.find(b"\r\n\r\n")
    if end < 0:
        return None
    m = _REQUEST_LINE.fullmatch(head[:head.find(b"\r\n")])
    return (m[1].decode(), m[2].decode()) if m else None


def http_probe(probes: Iterable[Probe], source: Address, target: str) -> Probe | None:
    return next((p for p in probes if p.http == target and p.matches_source(source)), None)


def tcp_prober(probes: Iterable[Probe], source: Address) -> bool:
    return any(p.tcp and p.matches_source(source) for p in probes)


def any_prober(probes: Iterable[Probe], source: Address) -> bool:
    return any(p.matches_source(source) for p in probes)


def parse_answer(raw: bytes) -> Answer | None:
    """An HTTP/1.0 answer read to its end (or ANSWER_LIMIT): status, reason, content type and body, or None when
    it does not start with a status line."""
    sep = raw.find(b"\r\n\r\n")
    head, body = (raw, b"") if sep < 0 else (raw[:sep], raw[sep + 4:])
    lines = head.split(b"\r\n")
    m = _STATUS_LINE.fullmatch(lines[0][:200])
    if m is None:
        return None
    content_type = ""
    for line in lines[1:64]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-type":
            content_type = _clean(value.strip().decode("latin-1"))[:200]
    return Answer(int(m[1]), _clean((m[2] or b"").decode("latin-1"))[:100], content_type, body[:BODY_LIMIT])


def render(answer: Answer, *, head_only: bool) -> bytes:
    """The answer sent to a prober: rebuilt, never the app's bytes as they came; the connection then closes."""
    head = (f"HTTP/1.1 {answer.status} {answer.reason}\r\n"
            + (f"Content-Type: {answer.content_type}\r\n" if answer.content_type else "")
            + f"Content-Length: {len(answer.body)}\r\nCache-Control: no-store\r\nConnection: close\r\n\r\n")
    return head.encode("latin-1") + (b"" if head_only else answer.body)


def _clean(text: str) -> str:
    return _PRINTABLE.sub("", text)
