"""What a hostile image, client or local user hands the daemon, without an engine: names that collide, an image
whose symlinks point at the host, a neighbour's checkpoint caught by a prefix, an endless readiness answer, a
metrics endpoint held open by thousands, and KSM left on by a killed daemon (issue 15 items 5-7, 9-11)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter

from activator.checkpoints.images import resolve_user
from activator.checkpoints.store import CheckpointStore
from activator.config.model import Volume, parse_config
from activator.daemon import scrape
from activator.errors import ConfigError
from activator.net.network import ident
from activator.runtime import imagefs, ksm, readiness, volumes
from activator.statedir import StateDir

P = Path("/etc/activator/services.yaml")


def test_names_that_differ_get_different_nftables_identifiers() -> None:
    names = ["web-a", "web_a", "weba", "web--a", "web__a", "web-_a", "web_-a", "a-u", "a_u", "a_d", "a-d"]
    idents = [ident(n) for n in names]
    assert len(set(idents)) == len(names), dict(zip(names, idents, strict=True))
    assert all(c.isalnum() or c == "_" for i in idents for c in i)


@pytest.mark.parametrize("name", ["web\n", "web\nx", "Web", "-web", "w" * 41, "we b"])
def test_a_service_name_with_a_trailing_newline_or_worse_is_refused(name: str) -> None:
    text = f'services:\n  "{name.encode("unicode_escape").decode()}":\n    image: x\n    listen: 127.0.0.1:1\n' \
           "    port: 1\n"
    with pytest.raises(ConfigError, match="service names are"):
        parse_config(text, P)


def test_sweeping_a_services_replaced_checkpoints_leaves_its_neighbours_alone(tmp_path: Path) -> None:
    store = CheckpointStore(StateDir(tmp_path))
    store.root.mkdir()
    mine = [store.root / ".retired-web-1700000000000000001", store.root / ".retired-web-1700000000000000002"]
    theirs = [store.root / ".retired-web-api-1700000000000000003", store.root / ".retired-web-x-9"]
    for d in mine + theirs:
        d.mkdir()
    assert sorted(store.sweep_retired("web")) == mine
    assert all(d.exists() for d in theirs) and not any(d.exists() for d in mine)
    assert sorted(store.sweep_retired()) == sorted(theirs)


@pytest.fixture
def hostile_image(tmp_path: Path) -> Path:
    """An unpacked image whose paths point out of it: /data -> /, /etc/passwd -> /etc/shadow, and a FIFO."""
    root = tmp_path / "rootfs"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "motd").write_text("the image's own\n")
    (root / "etc" / "group").write_text("app:x:1234:\n")
    os.symlink("/", root / "data")  # VOLUME /data/etc would be the host's /etc through the host's view
    os.symlink("/etc/shadow", root / "etc" / "passwd")
    os.symlink("../../../../../../etc", root / "up")
    os.mkfifo(root / "etc" / "fifo")
    return root


def test_image_paths_resolve_inside_the_image(hostile_image: Path) -> None:
    # /data -> / is the image's root, so /data/etc/motd is the image's file, not the host's
    assert imagefs.read_text(hostile_image, "/data/etc/motd") == "the image's own\n"
    assert imagefs.read_text(hostile_image, "/up/motd") == "the image's own\n"  # '..' stops at the root
    assert imagefs.read_text(hostile_image, "/etc/passwd") is None  # the image's /etc/shadow: absent
    assert imagefs.read_text(hostile_image, "/etc/fifo") is None  # not a regular file: never opened for reading
    # USER app: looked up in the image's passwd (which points nowhere), never in the host's /etc/shadow
    with pytest.raises(Exception, match="not in the image's /etc/passwd"):
        resolve_user(hostile_image, "root", "svc")
    # Positive control: a real entry is found.
    (hostile_image / "etc" / "passwd").unlink()
    (hostile_image / "etc" / "passwd").write_text("app:x:1234:1234::/:/bin/sh\n")
    assert resolve_user(hostile_image, "app", "svc") == (1234, 1234, ())


def test_a_named_volume_is_seeded_from_the_image_not_the_host(hostile_image: Path, tmp_path: Path) -> None:
    state = tmp_path / "state"
    (bind,) = volumes.ensure((Volume("seed", "/data/etc"),), state, hostile_image, "svc")
    assert sorted(p.name for p in bind.host.iterdir()) == ["fifo", "group", "motd", "passwd"]
    assert (bind.host / "motd").read_text() == "the image's own\n"
    assert not (bind.host / "shadow").exists() and not (bind.host / "hostname").exists()


async def _serve(handler) -> tuple[asyncio.Server, int]:  # type: ignore[no-untyped-def]
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    return server, int(server.sockets[0].getsockname()[1])


@pytest.mark.asyncio
async def test_a_readiness_answer_without_end_is_given_up_on() -> None:
    sent = 0

    async def endless(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        try:
            while True:
                writer.write(b"x" * 65536)
                sent += 65536
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    server, port = await _serve(endless)
    async with server:
        started = time.monotonic()
        ok = await readiness.http_ok(lambda: asyncio.open_connection("127.0.0.1", port), port, "/")
        assert not ok and time.monotonic() - started < 10
        assert sent > readiness.MAX_BODY  # it did read (and drop) past the bound, then stopped

        async def one_long_line(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(b"HTTP/1.1 200 " + b"y" * 200_000 + b"\r\n\r\n")
            await writer.drain()
            writer.close()

        server2, port2 = await _serve(one_long_line)
        async with server2:
            assert not await readiness.http_ok(lambda: asyncio.open_connection("127.0.0.1", port2), port2, "/")


def test_the_metrics_endpoint_holds_no_thread_per_connection_and_still_answers() -> None:
    registry = CollectorRegistry()
    Counter("activator_probe", "x", registry=registry).inc()
    server = scrape.ScrapeServer.listen(registry, "127.0.0.1", 0)
    idle: list[socket.socket] = []
    try:
        threads = threading.active_count()
        for _ in range(300):  # a local user holding connections open without a byte
            s = socket.create_connection(("127.0.0.1", server.port), timeout=5)
            idle.append(s)
        time.sleep(0.3)
        assert threading.active_count() == threads  # one thread for all of them
        # Past MAX_CONNECTIONS the rest were closed at once; a scrape waits at most TIMEOUT for a slot.
        closed = 0
        for s in idle:
            s.setblocking(False)
            try:
                closed += s.recv(1) == b""
            except BlockingIOError:
                pass
            except ConnectionResetError:
                closed += 1
        assert closed >= 300 - scrape.MAX_CONNECTIONS
        for s in idle:
            s.close()
        idle.clear()
        deadline = time.monotonic() + scrape.TIMEOUT + 5
        while True:  # the held slots are freed by the head timeout at the latest
            with socket.create_connection(("127.0.0.1", server.port), timeout=5) as c:
                c.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
                reply = b""
                while chunk := c.recv(65536):
                    reply += chunk
            if reply or time.monotonic() > deadline:
                break
        assert reply.startswith(b"HTTP/1.1 200 OK") and b"activator_probe_total 1.0" in reply
        with socket.create_connection(("127.0.0.1", server.port), timeout=5) as c:  # a head past MAX_HEAD
            c.sendall(b"GET /" + b"a" * (scrape.MAX_HEAD + 10))
            assert c.recv(100) == b""
    finally:
        for s in idle:
            s.close()
        server.shutdown()


@pytest.mark.skipif(not ksm.available() or os.geteuid() != 0, reason="needs root and /sys/kernel/mm/ksm")
def test_the_hosts_ksm_settings_come_back_after_a_killed_run(tmp_path: Path) -> None:
    before = {n: (ksm.KSM / n).read_text().strip() for n in ksm.SETTINGS}
    saved = tmp_path / ksm.SAVED_NAME
    try:
        k = ksm.Ksm(saved)
        k.start()
        assert (ksm.KSM / "run").read_text().strip() == "1" and saved.exists()
        assert oct(saved.stat().st_mode & 0o777) == "0o600"
        # killed here: no stop(). The next start (host.clean_leftovers) puts the host's settings back.
        assert ksm.restore_saved(saved)
        assert {n: (ksm.KSM / n).read_text().strip() for n in ksm.SETTINGS} == before
        assert not saved.exists() and not ksm.restore_saved(saved)
    finally:
        for n in ("pages_to_scan", "sleep_millisecs", "run"):
            (ksm.KSM / n).write_text(before[n])


def test_an_apps_output_cannot_drive_the_operators_terminal() -> None:
    """`activator logs` on a terminal: what a hostile image's app printed (a window retitle, a screen clear, a
    carriage return hiding a line) is shown escaped; newlines, tabs and text come through as they are."""
    from activator.cli import terminal_safe

    hostile = b"ok\tfine\n\x1b]0;owned\x07\x1b[2Jfake prompt\r# \x7f\n"
    shown = terminal_safe(hostile)
    assert not any(b in shown for b in (b"\x1b", b"\x07", b"\r", b"\x7f"))
    assert shown == b"ok\tfine\n\\x1b]0;owned\\x07\\x1b[2Jfake prompt\\x0d# \\x7f\n"
