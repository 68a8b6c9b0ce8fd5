"""A start-up that fails or is stopped half-way undoes exactly what it acquired, in reverse (server.py's
AsyncExitStack and the listener contract, daemon/listening.py): the agent's port, the last listener to start, held
by another local user; a stop while the first checkpoint is being built (an app that never listens)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from pathlib import Path

import pytest

from activator.config.parse import load_config
from activator.daemon.server import Activator
from activator.errors import ActivatorError
from tests.conftest import ECHO, HTTPD, echo, eventually, free_port, host_resources, write_config

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


async def test_a_stop_while_the_first_checkpoint_builds_leaves_nothing(tmp_path: Path) -> None:
    web, metrics = free_port(), free_port()
    mute = HTTPD | {"listen": f"127.0.0.1:{web}", "command": ["sleep", "600"], "readiness": {"timeout": "120s"}}
    path = write_config(tmp_path, {"mute": mute}, metrics=f"127.0.0.1:{metrics}")
    act = Activator(load_config(path))
    state = act.state.root
    # What serve() does on a stop request before startup is done: cancel it, then shut down.
    starting = asyncio.ensure_future(act.startup())
    try:
        await eventually(lambda: host_resources(state)["runc"], timeout=60, what="the template's build under way")
        assert not _binds(web) and not _binds(metrics) and act.state.control_socket.exists()
        assert not starting.done()
    finally:
        starting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await starting
        await act.shutdown()
    assert act.teardown_failures == []
    assert host_resources(state) == {k: [] for k in host_resources(state)}
    assert _binds(web) and _binds(metrics) and not act.state.control_socket.exists()
    # The lock went too: the same state dir starts again (the positive control).
    again = Activator(load_config(write_config(tmp_path, {"web": ECHO | {"listen": f"127.0.0.1:{web}"}})))
    try:
        await again.startup()
        assert await echo(web, b"after the stop") == b"after the stop"
    finally:
        await again.shutdown()
