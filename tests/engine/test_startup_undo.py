"""A start-up that fails half-way undoes exactly what it acquired, in reverse (server.py's AsyncExitStack and the
listener contract, daemon/listening.py): here the agent's port, the last listener to start, is held by another
local user, after the state dir was locked, the services' sockets bound and served, the control socket and the
metrics endpoint started."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from activator.config.parse import load_config
from activator.daemon.server import Activator
from activator.errors import ActivatorError
from tests.conftest import ECHO, echo, free_port, write_config

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]


def _binds(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


async def test_a_taken_agent_port_undoes_everything_startup_had_acquired(tmp_path: Path) -> None:
    squatter = socket.socket()  # another local user got there first
    squatter.bind(("127.0.0.1", 0))
    squatter.listen(1)
    taken = squatter.getsockname()[1]
    web, metrics = free_port(), free_port()
    path = write_config(tmp_path, {"web": ECHO | {"listen": f"127.0.0.1:{web}"}}, metrics=f"127.0.0.1:{metrics}",
                        agent={"listen": f"127.0.0.1:{taken}"})
    act = Activator(load_config(path))
    with pytest.raises(ActivatorError, match=f"settings.agent.listen: cannot listen on 127.0.0.1:{taken}: "):
        await act.serve()
    assert act.teardown_failures == []
    assert act.fleet.listening == {}
    assert _binds(web), "the service's socket was left open"
    assert _binds(metrics), "the metrics endpoint was left listening"
    assert not act.state.control_socket.exists(), "the control socket was left behind"
    # The lock went too: the same file starts once the port is free (the positive control) and serves.
    squatter.close()
    again = Activator(load_config(path))
    try:
        await again.startup()
        assert await echo(web, b"after the failed start") == b"after the failed start"
    finally:
        await again.shutdown()
    assert again.teardown_failures == []
