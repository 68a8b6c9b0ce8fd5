"""The JSON Schema editors use (config/activator.schema.json) is derived from the same declarations as the parser:
it is current, the bundled demo validates against it, and it refuses what the parser refuses."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from activator.config.model import json_schema, load_config

ROOT = Path(__file__).resolve().parents[2]
PUBLISHED = ROOT / "config" / "activator.schema.json"


@functools.cache
def validator() -> Any:
    """What jsonschema.validate makes on every call (the schema checked against its metaschema first), made once."""
    schema = json_schema()
    cls = jsonschema.validators.validator_for(schema)
    cls.check_schema(schema)
    return cls(schema)


def test_published_schema_is_current() -> None:
    assert json.loads(PUBLISHED.read_text()) == json_schema(), \
        "regenerate it: .venv/bin/activator schema > config/activator.schema.json"


def test_demo_config_validates_against_the_schema() -> None:
    demo = ROOT / "config" / "demo.yaml"
    validator().validate(yaml.safe_load(demo.read_text()))
    load_config(demo)  # and the parser agrees


@pytest.mark.parametrize("bad", [
    {"services": {"web": {"image": "x", "listen": 1, "port": 80, "colour": "red"}}},
    {"services": {"web": {"image": "x", "listen": 1}}},
    {"services": {"web": {"image": "x", "listen": 1, "port": 0}}},
    {"services": {"web": {"image": "x", "listen": 1, "port": 80, "wake_on": "syn"}}},
    {"services": {"Web!": {"image": "x", "listen": 1, "port": 80}}},
    {"settings": {"verbose": True}, "services": {"web": {"image": "x", "listen": 1, "port": 80}}},
])
def test_schema_refuses_what_the_parser_refuses(bad: dict[str, object]) -> None:
    with pytest.raises(jsonschema.ValidationError):
        validator().validate(bad)
