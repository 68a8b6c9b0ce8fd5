"""Reloading the configuration while serving (real daemon objects, real instances, real sockets).

Added services start, removed ones stop accepting and drain, changed ones get their new definition while open
connections finish on the old one, unchanged ones are not touched; a bad file changes nothing."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.errors import ActivatorError, ConfigError
from tests.conftest import ECHO, echo, eventually, free_port, host_resources, open_echo

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]


def rewrite(path: Path, services: dict[str, Any], **settings: Any) -> None:
    body = yaml.safe_load(path.read_text())
    body["services"] = services
    body["settings"] |= settings
    path.write_text(yaml.safe_dump(body))


def listen_of(run: Any, name: str) -> str:
    return f"127.0.0.1:{run.port(name)}"


async def roundtrip(conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], payload: bytes) -> bytes:
    reader, writer = conn
    writer.write(payload)
    await writer.drain()
    return await asyncio.wait_for(reader.readexactly(len(payload)), 10)


async def test_reload_adds_removes_changes_and_leaves_the_rest_alone(start, caplog) -> None:  # type: ignore[no-untyped-def]
    run = await start({"keep": ECHO, "gone": ECHO, "changed": ECHO})
    act = run.act
    state = run.config.settings.state_dir
    conns = {name: await open_echo(run.port(name)) for name in ("keep", "gone", "changed")}
    keep_instance = act.services["keep"].instances[0]
    old_changed = act.services["changed"]
    old_checkpoint = old_changed.checkpoint
    assert old_checkpoint is not None
    gone_port, new_port = run.port("gone"), free_port()

    rewrite(run.config.path, {
        "keep": ECHO | {"listen": listen_of(run, "keep")},
        "changed": ECHO | {"listen": listen_of(run, "changed"), "environment": {"GREETING": "v2"}},
        "added": ECHO | {"listen": f"127.0.0.1:{new_port}"},
    })
    assert (await act.plan())["changes"] == [
        f"add added (on 127.0.0.1:{new_port})",
        "remove gone (its connections drain first)",
        "change changed: environment (a new checkpoint; running instances finish on the old definition)",
        "keep keep untouched",
    ]
    result = await act.reload()
    assert result["changes"][0].startswith("add added")

    # added: served
    assert await echo(new_port, b"new") == b"new"
    # unchanged: the very same instance, its connection untouched
    assert act.services["keep"].instances == [keep_instance]
    assert await roundtrip(conns["keep"], b"still") == b"still"
    # removed: no new connection, the open one finishes, then everything of it goes
    with pytest.raises(OSError):
        await asyncio.wait_for(asyncio.open_connection("127.0.0.1", gone_port), 5)
    assert "gone" not in act.services
    assert await roundtrip(conns["gone"], b"draining") == b"draining"
    # changed: a new checkpoint for new connections, the open one still on the old instance
    await eventually(lambda: act.services["changed"] is not old_changed, timeout=60, what="the new definition")
    new_changed = act.services["changed"]
    assert new_changed.checkpoint is not None and new_changed.checkpoint.origin != old_checkpoint.origin
    assert await echo(run.port("changed"), b"v2") == b"v2"
    assert new_changed.instances and new_changed.instances[0].checkpoint is new_changed.checkpoint
    assert await roundtrip(conns["changed"], b"old one") == b"old one"

    for name in ("gone", "changed"):
        conns[name][1].close()
    await eventually(lambda: not act.status()["retiring"], what="the old definitions drained and closed")
    for family in ("activator_connections_total", "activator_proxied_bytes_total", "activator_instances"):
        assert not [s for m in act.metrics.registry.collect() if m.name + "_total" == family or m.name == family
                    for s in m.samples if s.labels.get("service") == "gone"], family
    assert act.metrics.registry.get_sample_value("activator_reloads_total", {"result": "applied"}) == 1
    # nothing of the old definitions is left: the instances are the live ones', the old checkpoint is swept
    await eventually(lambda: not list((state / "checkpoints").glob(".retired-*")), what="the replaced one swept")
    names = sorted(i.sandbox.name for s in act.services.values() for i in s.instances)
    dirs = sorted(Path(d).name for d in host_resources(state)["dirs"])
    assert dirs == names, (dirs, names)
    conns["keep"][1].close()
    assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


async def test_a_bad_file_is_refused_in_one_line_and_nothing_changes(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = await start({"echo": ECHO})
    act, path = run.act, run.config.path
    good = path.read_text()
    assert await echo(run.port("echo"), b"a") == b"a"
    instance = act.services["echo"].instances[0]
    moved = yaml.safe_load(good)
    moved["settings"]["state_dir"] = str(tmp_path / "elsewhere")
    bad_files = {
        "services: [unclosed": "line 1",
        yaml.safe_dump(moved): "settings.state_dir changed",
        good.replace("  echo:\n", "  echo:\n    colour: red\n"): "colour",
    }
    for text, what in bad_files.items():
        path.write_text(text)
        with pytest.raises(ConfigError) as e:
            await act.reload()
        assert "\n" not in str(e.value) and str(path) in str(e.value) and what in str(e.value), str(e.value)
        assert act.config.path == path and [s.name for s in act.config.services] == ["echo"]
    path.write_text(good)
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        rewrite(path, {"echo": ECHO | {"listen": f"127.0.0.1:{run.port('echo')}"},
                       "busy": ECHO | {"listen": f"127.0.0.1:{blocker.getsockname()[1]}"}})
        with pytest.raises(ActivatorError, match="already in use"):
            await act.reload()
    assert list(act.services) == ["echo"] and act.services["echo"].instances == [instance]
    assert act.metrics.registry.get_sample_value("activator_reloads_total", {"result": "refused"}) == 4
    assert await echo(run.port("echo"), b"b") == b"b"



async def test_a_reload_that_supersedes_one_still_building(start, caplog) -> None:  # type: ignore[no-untyped-def]
    """Two edits in quick succession: the first one's checkpoint is still building when the second arrives. The
    second wins, the first build is stopped and leaves nothing, and the running instance drains as usual."""
    slow = ECHO | {"command": ["sh", "-c", "sleep 1.5; exec echo-server 9000"]}
    run = await start({"svc": ECHO})
    act, state = run.act, run.config.settings.state_dir
    conn = await open_echo(run.port("svc"))
    original = act.services["svc"]
    listen = listen_of(run, "svc")
    rewrite(run.config.path, {"svc": slow | {"listen": listen, "environment": {"V": "2"}}})
    await act.reload()
    await asyncio.sleep(0.5)  # the v2 template is starting (it sleeps before it listens)
    assert act.services["svc"] is original
    rewrite(run.config.path, {"svc": ECHO | {"listen": listen, "environment": {"V": "3"}}})
    await act.reload()
    await eventually(lambda: act.services["svc"] is not original, timeout=60, what="the v3 definition")
    assert dict(act.services["svc"].config.environment) == {"V": "3"}
    assert await echo(run.port("svc"), b"v3") == b"v3"
    assert await roundtrip(conn, b"still v1") == b"still v1"
    conn[1].close()
    await eventually(lambda: not act.status()["retiring"], what="v1 drained")
    await eventually(lambda: not list((state / "checkpoints").glob(".build-*")), what="the v2 build cleaned up")
    names = sorted(i.sandbox.name for s in act.services.values() for i in s.instances)
    await eventually(lambda: sorted(Path(d).name for d in host_resources(state)["dirs"]) == names,
                     what="nothing but the live instance")
    assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


async def test_a_new_idle_timeout_applies_in_place_and_a_new_command_still_replaces(start, caplog) -> None:  # type: ignore[no-untyped-def]
    """Issue 31 item 4: a setting that shapes neither the checkpoint nor the instance is taken by the running
    service; its instance keeps serving (no restore paid), and the new value is the one that reaps it."""
    run = await start({"echo": ECHO | {"idle_timeout": "5m"}})
    act, listen = run.act, listen_of(run, "echo")
    conn = await open_echo(run.port("echo"))
    assert await roundtrip(conn, b"before") == b"before"
    service = act.services["echo"]
    (instance,) = service.instances
    pid = instance.sandbox.pid_now()
    restores = act.metrics.registry.get_sample_value("activator_restores_total", {"service": "echo"})
    assert pid is not None and restores

    rewrite(run.config.path, {"echo": ECHO | {"listen": listen, "idle_timeout": "4m"}})
    assert (await act.plan())["changes"] == ["change echo: idle_timeout (in place: running instances keep serving)"]
    await act.reload()
    assert act.services["echo"] is service and service.config.idle_timeout == 240
    assert service.instances == [instance] and instance.sandbox.pid_now() == pid
    assert await roundtrip(conn, b"after") == b"after"
    assert await echo(run.port("echo"), b"new one") == b"new one"
    assert service.instances == [instance]
    assert act.metrics.registry.get_sample_value("activator_restores_total", {"service": "echo"}) == restores
    assert not act.status()["retiring"]
    conn[1].close()
    await eventually(lambda: service.open_connections == 0, what="the connections closed")

    # Idle now under a 4-minute timer: the reload re-arms it with the new value, which reaps it (the old one
    # would keep it for minutes past this wait).
    rewrite(run.config.path, {"echo": ECHO | {"listen": listen, "idle_timeout": "1s"}})
    await act.reload()
    await eventually(lambda: not service.instances, timeout=60, what="the instance reaped after the new idle_timeout")
    assert act.services["echo"] is service
    assert act.metrics.registry.get_sample_value("activator_idle_reaps_total", {"service": "echo"}) == 1

    # The control: a new command shapes the process, so the service is replaced as before. The same server by
    # its full path: `echo-server 9000 0` (as this test had it) drops its listener on a restore, which resets a
    # connection that came in first (that app's documented behaviour, not the reload's).
    rewrite(run.config.path, {"echo": ECHO | {"listen": listen, "idle_timeout": "1s",
                                              "command": ["/bin/echo-server", "9000"]}})
    assert (await act.plan())["changes"] == [
        "change echo: command (a new checkpoint; running instances finish on the old definition)"]
    await act.reload()
    await eventually(lambda: act.services["echo"] is not service, timeout=60, what="the new definition")
    assert await echo(run.port("echo"), b"v2") == b"v2"
    assert not [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
