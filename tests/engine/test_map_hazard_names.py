"""33.3: the map hazard names a path the app chose, and it reaches the operator's log as one line.

A real build of the busybox demo whose app (the image author's code) copies busybox to
`/tmp/x<newline>service=db level=ERROR .../libjemalloc.so.2` and runs httpd from it: its checkpoint has a jemalloc
hazard by that file's name, and under restore_memory: map the daemon warns once naming it. Before the path was
escaped the warning carried the newline, and what followed it read as a line of the daemon's own about another
service. Control: the hazard is still found (restored by copy, one warning naming jemalloc and the path) and the
instance serves.
"""

from __future__ import annotations

import json
import logging
import socket
from pathlib import Path

import pytest

from activator.config.model import load_config
from activator.daemon.server import Activator
from tests.conftest import HTTPD, http_get, write_config

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

FORGED = "service=db level=ERROR CRIU restore failed"
SCRIPT = (f'D="/tmp/x$(printf "\\n{FORGED}")"; mkdir -p "$D" && cp /bin/busybox "$D/libjemalloc.so.2" && '
          'ln -s libjemalloc.so.2 "$D/httpd" && exec "$D/httpd" -f -p 8080 -h /www')


async def test_a_hazard_path_with_a_newline_is_one_escaped_log_line(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    services = {"web": HTTPD | {"command": ["sh", "-c", SCRIPT], "restore_memory": "map", "prepared_slots": 0,
                                "listen": f"127.0.0.1:{sock.getsockname()[1]}"}}
    caplog.set_level(logging.INFO)
    act = Activator(load_config(write_config(tmp_path, services)), sockets=[sock])
    await act.startup()
    try:
        got = await http_get(sock.getsockname()[1], "/")
    finally:
        await act.shutdown()
    assert got.startswith(b"HTTP/1.") and b" 200 " in got.split(b"\r\n")[0], got[:200]  # control: it serves
    meta = json.loads((tmp_path / "state" / "checkpoints" / "web" / "meta.json").read_text())
    hazard = meta["map_hazard"]
    assert hazard.startswith("jemalloc (/tmp/x") and hazard.endswith("/libjemalloc.so.2)"), hazard  # found
    assert hazard.isprintable() and f"\\n{FORGED}" in hazard, hazard
    warned = [r.getMessage() for r in caplog.records if "restore_memory: map is not used" in r.getMessage()]
    assert len(warned) == 1 and "jemalloc" in warned[0], warned
    carrying = [r.getMessage() for r in caplog.records if FORGED in r.getMessage()]
    assert carrying and not [m for m in carrying if "\n" in m or "\r" in m], carrying
