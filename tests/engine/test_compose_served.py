"""A Compose service served for real (the translation itself: tests/unit/test_compose.py)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.unit.test_compose import load


@pytest.mark.engine
@pytest.mark.asyncio
async def test_a_compose_service_is_served(tmp_path: Path) -> None:
    from activator.daemon.server import Activator
    from tests.conftest import BUSYBOX, echo, free_port

    port = free_port()
    cfg = load(tmp_path, f"""
x-activator:
  settings: {{state_dir: {tmp_path / 'state'}, metrics: null}}
services:
  echo:
    image: {BUSYBOX}
    command: echo-server 9000
    ports: ["127.0.0.1:{port}:9000"]
    x-activator: {{idle_timeout: 1m}}
""")
    act = Activator(cfg)  # type: ignore[arg-type]
    try:
        await act.startup()
        assert await echo(port, b"composed") == b"composed"
    finally:
        await act.shutdown()
