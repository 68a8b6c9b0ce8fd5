"""Probes answered by the activator (core/probes.py, config Probes): parsing the config, recognising a probe in
a held request, and rebuilding answers so that neither a prober nor an app can smuggle anything through."""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest

from activator.config.model import parse_config, probe_paths
from activator.core import probes
from activator.errors import ConfigError


def service(probes_yaml: str, extra: str = ""):  # type: ignore[no-untyped-def]
    text = f"services:\n  web: {{image: x, listen: 8080, port: 80, probes: {probes_yaml}{extra}}}\n"
    return parse_config(text, Path("/etc/activator/x.yaml")).services[0]


def test_config() -> None:
    svc = service("[{http: /healthz, from: [10.0.0.0/8, '192.168.1.7']}, {tcp: true, from: 10.1.0.0/16}]")
    http, tcp = svc.probes
    assert http.http == "/healthz" and not http.tcp and str(http.sources[1]) == "192.168.1.7/32"
    assert tcp.tcp and tcp.http is None
    assert http.matches_source(ipaddress.ip_address("10.2.3.4"))
    assert http.matches_source(ipaddress.ip_address("::ffff:10.2.3.4"))  # a dual-stack listener's view
    assert not http.matches_source(ipaddress.ip_address("11.0.0.1"))
    assert probe_paths(svc.probes) == ["/healthz"]


def test_only_the_paths_shape_the_checkpoint() -> None:
    a = service("[{http: /healthz, from: [10.0.0.0/8]}]")
    b = service("[{http: /healthz, from: [172.16.0.0/12]}, {tcp: true, from: [10.0.0.0/8]}]")
    c = service("[{http: /ready, from: [10.0.0.0/8]}]")
    assert a.checkpoint_fingerprint() == b.checkpoint_fingerprint() != c.checkpoint_fingerprint()
    assert service("[]").checkpoint_fingerprint() == parse_config(
        "services:\n  web: {image: x, listen: 8080, port: 80}\n", Path("/x.yaml")).services[0].checkpoint_fingerprint()


@pytest.mark.parametrize(("yaml", "says"), [
    ("[{http: /healthz}]", "probes: [0].from: the prober's addresses are required"),
    ("[{http: healthz, from: [10.0.0.0/8]}]", "[0].http: str 'healthz' is not an absolute URL path"),
    ("[{http: /a, tcp: true, from: [10.0.0.0/8]}]", "[0]: give http: /path or tcp: true (one of them)"),
    ("[{from: [10.0.0.0/8]}]", "[0]: give http: /path or tcp: true"),
    ("[{tcp: true, from: [10.0.0.300/8]}]", "'10.0.0.300/8' is not an address or a CIDR network"),
    ("[{http: /a, from: [10.0.0.0/8], method: POST}]", "[0]: expected {http: /path, from: [CIDR]}"),
    ("yes", "expected a list of"),
])
def test_refusals(yaml: str, says: str) -> None:
    with pytest.raises(ConfigError, match=r"/etc/activator/x.yaml: services.web.probes: .*") as e:
        service(yaml)
    assert says in str(e.value) and "\n" not in str(e.value)


def test_not_with_handoff() -> None:
    with pytest.raises(ConfigError, match="handoff: true: the apps accept every connection themselves"):
        service("[{tcp: true, from: [10.0.0.0/8]}]", ", handoff: true")


@pytest.mark.parametrize(("held", "expected"), [
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n", ("GET", "/healthz")),
    (b"HEAD /healthz?x=1 HTTP/1.0\r\n\r\n", ("HEAD", "/healthz?x=1")),
    (b"POST /healthz HTTP/1.1\r\n\r\n", None),
    (b"GET /healthz HTTP/1.1\r\nHost: x\r\n", None),  # not complete
    (b"GET /healthz HTTP/2.0\r\n\r\n", None),
    (b"GET /a b HTTP/1.1\r\n\r\n", None),
    (b"GET /" + b"a" * probes.HEAD_LIMIT + b" HTTP/1.1\r\n\r\n", None),
])
def test_requests(held: bytes, expected: tuple[str, str] | None) -> None:
    assert probes.request(held) == expected


def test_answers_are_rebuilt_and_bounded() -> None:
    raw = (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nSet-Cookie: x=1\r\nContent-Length: 9\r\n\r\n"
           b'{"up":1}\n')
    a = probes.parse_answer(raw)
    assert a == probes.Answer(200, "OK", "application/json", b'{"up":1}\n')
    out = probes.render(a, head_only=False)
    assert out.startswith(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n") and b"Set-Cookie" not in out
    assert out.endswith(b"\r\n\r\n" + b'{"up":1}\n') and b"Content-Length: 9\r\n" in out
    assert probes.render(a, head_only=True).endswith(b"Connection: close\r\n\r\n")
    assert probes.Answer.from_json(a.to_json()) == a
    # a hostile app: a header smuggled through the reason or the type, an endless body
    assert probes.parse_answer(b"HTTP/1.0 200 OK\rX-Evil: 1\r\n\r\n") is None  # not a status line: no answer
    evil = probes.parse_answer(b"HTTP/1.0 200 OK\r\nContent-Type: text/html\rX-Evil: 1\x00\r\n\r\n" + b"x" * 10**6)
    assert evil is not None and evil.content_type == "text/htmlX-Evil: 1"  # control characters dropped
    assert b"\r\nX-Evil" not in probes.render(evil, head_only=True)
    assert len(evil.body) == probes.BODY_LIMIT
    assert probes.parse_answer(b"SSH-2.0-OpenSSH\r\n") is None
