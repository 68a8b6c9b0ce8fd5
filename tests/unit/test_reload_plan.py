"""reload.plan_reload: what a reload would change (pure logic, no engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.config.model import load_config
from activator.core.reloadplan import plan_reload
from activator.errors import ConfigError

SVC = {"image": "busybox", "listen": "127.0.0.1:8001", "port": 80}


def cfg(tmp_path: Path, services: dict[str, Any], name: str, **settings: Any) -> Any:
    path = tmp_path / name
    path.write_text(yaml.safe_dump({"settings": {"state_dir": "/var/lib/x"} | settings, "services": services}))
    return load_config(path)


def test_each_kind_of_change_is_told_apart(tmp_path: Path) -> None:
    old = cfg(tmp_path, {"a": SVC, "b": SVC | {"listen": "127.0.0.1:8002"}, "c": SVC | {"listen": "127.0.0.1:8003"},
                         "d": SVC | {"listen": "127.0.0.1:8004"}}, "old.yaml")
    new = cfg(tmp_path, {"a": SVC, "b": SVC | {"listen": "127.0.0.1:8002", "idle_timeout": "1m"},
                         "c": SVC | {"listen": "127.0.0.1:8003", "command": ["x"]},
                         "e": SVC | {"listen": "127.0.0.1:8005"}}, "new.yaml")
    p = plan_reload(old, new)
    assert [s.name for s in p.added] == ["e"] and [s.name for s in p.removed] == ["d"]
    assert [(c.new.name, c.keys, c.new_checkpoint) for c in p.changed] == [
        ("b", ("idle_timeout",), False), ("c", ("command",), True)]
    assert p.unchanged == ("a",)
    assert plan_reload(old, old).empty and plan_reload(old, old).describe() == ["keep a, b, c, d untouched"]


def test_auto_memory_sharing_follows_the_number_of_services(tmp_path: Path) -> None:
    one = cfg(tmp_path, {"a": SVC}, "one.yaml")
    two = cfg(tmp_path, {"a": SVC, "b": SVC | {"listen": "127.0.0.1:8002"}}, "two.yaml")
    p = plan_reload(one, two)
    # Issue 16 item 7: the first service's definition did not change, so it is not retired; only its next
    # instances stop sharing (and the plan says so).
    assert p.changed == () and p.unchanged == ("a",) and p.resharing == (("a", False),)
    assert any("a: memory sharing (share_memory: auto) turns off for its next instances" in line
               for line in p.describe())
    back = plan_reload(two, one)
    assert back.changed == () and back.resharing == (("a", True),)


@pytest.mark.parametrize("setting", [{"metrics": "127.0.0.1:1"}, {"state_dir": "/elsewhere"},
                                     {"network": {"subnet": "10.99.0.0/24"}}, {"runc": "/opt/runc"}])
def test_settings_that_need_a_restart_refuse_the_reload(tmp_path: Path, setting: dict[str, Any]) -> None:
    old = cfg(tmp_path, {"a": SVC}, "old.yaml")
    new = cfg(tmp_path, {"a": SVC}, "new.yaml", **setting)
    with pytest.raises(ConfigError, match=f"settings.{next(iter(setting))} changed.*restart"):
        plan_reload(old, new)


def test_drain_timeout_may_change(tmp_path: Path) -> None:
    old = cfg(tmp_path, {"a": SVC}, "old.yaml")
    assert plan_reload(old, cfg(tmp_path, {"a": SVC}, "new.yaml", drain_timeout="1m")).empty


def test_trusted_keys_change_on_a_reload(tmp_path: Path) -> None:
    """Adding a builder's key (or rotating one) touches no running instance: a reload, said as such."""
    old = cfg(tmp_path, {"a": SVC}, "old.yaml")
    plan = plan_reload(old, cfg(tmp_path, {"a": SVC}, "new.yaml", checkpoint_trust={"keys": ["/etc/b.pub"]}))
    assert plan.settings == ("checkpoint_trust",) and plan.empty
    assert any(line.startswith("settings.checkpoint_trust: the next import, pull") for line in plan.describe())


@pytest.mark.parametrize("changes", [{"idle_timeout": "1m"}, {"standby": 1}, {"max_instances": 3},
                                     {"min_instances": 1, "max_waiting": 5}, {"max_connections": 50},
                                     {"restore_timeout": "3s", "stop_grace": "2s"}])
def test_what_only_the_services_decisions_read_changes_in_place(tmp_path: Path, changes: dict[str, Any]) -> None:
    old = cfg(tmp_path, {"a": SVC}, "old.yaml")
    new = cfg(tmp_path, {"a": SVC | changes}, "new.yaml")
    (c,) = plan_reload(old, new).changed
    assert c.in_place and not c.new_checkpoint and set(c.keys) == set(changes)
    assert plan_reload(old, new).describe() == [
        f"change a: {', '.join(c.keys)} (in place: running instances keep serving)"]


@pytest.mark.parametrize("changes", [{"command": ["x"]}, {"listen": "127.0.0.1:8009"}, {"handoff": True},
                                     {"idle_timeout": "1m", "command": ["x"]}, {"prepared_slots": 2},
                                     {"resources": {"memory": "64M"}}, {"egress": False}])
def test_what_shapes_the_instance_or_its_listeners_still_replaces_it(tmp_path: Path,
                                                                      changes: dict[str, Any]) -> None:
    old = cfg(tmp_path, {"a": SVC}, "old.yaml")
    new = cfg(tmp_path, {"a": SVC | changes}, "new.yaml")
    (c,) = plan_reload(old, new).changed
    assert not c.in_place
    assert "running instances finish on the old definition" in plan_reload(old, new).describe()[0]
