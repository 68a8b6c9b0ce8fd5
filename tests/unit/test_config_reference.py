"""The configuration reference (docs/configuration.md) is rendered from the declarations the parser uses: it is
current, every key has an example that the parser takes, and what it says a change takes (a reload, a checkpoint
rebuild, a restart) is what core/reloadplan.py decides for that change."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.config.model import ServiceConfig, Settings, parse_config
from activator.core import reference
from activator.core.reloadplan import plan_reload
from activator.errors import ConfigError

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "docs" / "configuration.md"
P = Path("/etc/activator/config.yaml")

#: a file every example is tried in: each example's value differs from what it has here
BASE: dict[str, Any] = {
    "settings": {"checkpoint_trust": {"keys": ["/k.pub"], "sign_key": "/k.key"},
                 "checkpoint_registry": {"repository": "reg.example/x"},
                 "agent": {"listen": "127.0.0.1:19465"}},
    "services": {"web": {"image": "x:1", "listen": "127.0.0.1:18080", "port": 8080},
                 "db": {"image": "db:1", "listen": "0.0.0.0:15432", "port": 5432}},
}
#: what an example needs beside it in the same service
BESIDE: dict[str, dict[str, Any]] = {"waiting_page": {"http": True}}


def test_published_reference_is_current() -> None:
    assert PUBLISHED.read_text() == reference.markdown(), \
        "regenerate it: .venv/bin/activator schema --markdown > docs/configuration.md"


def test_every_key_has_an_example_and_no_example_is_stale() -> None:
    keys = reference.every_key()
    assert set(keys) == set(reference.EXAMPLES), (set(keys) ^ set(reference.EXAMPLES))
    for path in keys:
        assert f"### `{path if path.startswith('settings.') else 'services.NAME.' + path}`" in reference.markdown()


def _with(path: str) -> dict[str, Any]:
    doc = copy.deepcopy(BASE)
    at = doc if path.startswith("settings.") else doc["services"]["web"]
    if not path.startswith("settings."):
        at.update(BESIDE.get(path, {}))
    *parents, leaf = path.split(".")
    for p in parents:
        at = at.setdefault(p, {})
    value = yaml.safe_load(f"v: {reference.EXAMPLES[path]}")["v"]
    assert at.get(leaf) != value, f"{path}: the example is what the base file has already"
    if isinstance(value, dict) and isinstance(at.get(leaf), dict):
        at[leaf] = at[leaf] | value
    else:
        at[leaf] = value
    return doc


@pytest.mark.parametrize("path", reference.every_key())
def test_each_example_is_valid_and_its_change_takes_what_the_reference_says(path: str) -> None:
    old = parse_config(yaml.safe_dump(BASE), P)
    new = parse_config(yaml.safe_dump(_with(path)), P)  # the example parses, in a file of its own
    says = reference.change(path, dict(reference.declared(Settings, "settings.")
                                       + reference.declared(ServiceConfig))[path])
    if says == reference.RESTART:
        with pytest.raises(ConfigError, match="take effect on a restart"):
            plan_reload(old, new)
        return
    plan = plan_reload(old, new)
    if path.startswith("settings."):
        assert says == reference.RELOAD and plan.empty
        return
    (changed,) = plan.changed
    assert changed.new.name == "web"
    if says == reference.REBUILD:
        assert changed.new_checkpoint
    elif says == reference.RELOAD:
        assert not changed.new_checkpoint
    else:  # a section, or probes: the keys inside say
        assert "as its keys say" in says or path == "probes"


def test_types_and_defaults_read_as_written() -> None:
    text = reference.markdown()
    assert "| [`services.NAME.max_instances`](#servicesnamemax_instances) | whole number | `1` | reload |" in text
    assert "| [`settings.drain_timeout`](#settingsdrain_timeout) | duration | `10s` | reload |" in text
    assert "| [`services.NAME.image`](#servicesnameimage) | string | required | reload; rebuilds the checkpoint |" \
        in text
    assert "- range: 10ms to 30d\n- example: `idle_timeout: 30m`" in text
