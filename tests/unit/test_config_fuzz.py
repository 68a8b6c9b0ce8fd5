"""Property: whatever file `activator validate` is given, it answers with exit code 0 or 2, never a traceback:
"ok" and each service's addresses, or its problems, each on one line naming the file (issue 31: all of them).
Documents are generated from the real keys (so most get deep into validation) with hostile values (NaN, huge
numbers, wrong types, nesting, aliases), plus arbitrary text and bytes.

Bounded for tests/unit's budget: each property runs a few dozen examples, seeded from the test's name (the same
cases every run, so a failure here is reproducible and not luck), plus fixed examples that reach what random
documents rarely do (a valid file, NaN, a huge number, an alias, deep nesting). The long version draws fresh cases
each run, as many as asked:
    ACTIVATOR_FUZZ_EXAMPLES=2000 .venv/bin/pytest tests/unit/test_config_fuzz.py
"""

from __future__ import annotations

import contextlib
import io
import os
import tempfile
from collections.abc import Iterator
from dataclasses import fields
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from activator import cli
from activator.config.model import Backoff, Readiness, Resources, ServiceConfig, Settings

#: ACTIVATOR_FUZZ_EXAMPLES=N: N fresh examples per property instead of the bounded, seeded default
LONG_RUN = int(os.environ.get("ACTIVATOR_FUZZ_EXAMPLES", "0"))


def fuzz(examples: int) -> settings:
    if LONG_RUN:
        return settings(max_examples=LONG_RUN, deadline=None, suppress_health_check=[HealthCheck.too_slow])
    return settings(max_examples=examples, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(autouse=True, scope="module")
def _one_parser() -> Iterator[None]:
    """cli.main as `activator validate` runs it, with its parser built once: building it (21 subcommands through
    argparse and gettext) costs more than validating a file, and a parser parses any number of command lines."""
    parser = cli.build_parser()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(cli, "build_parser", lambda: parser)
        yield


def _keys(cls: type) -> list[str]:
    return [f.name for f in fields(cls) if "kind" in f.metadata]


SCALARS = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from(["5s", "250ms", "1h", "2d", "1ns", "-1s", "127.0.0.1:8080", "[::1]:80", ":80", "18:00",
                     "127.0.0.1:0", "512m", "1g", "v1", "v2", "data", "connect", "none", "cold-start", "default",
                     "unconfined", "/nonexistent/profile.json", "/", "", "x" * 300, "web", "\x00", "üñí"]),
    st.text(max_size=30),
)
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                       st.dictionaries(st.text(max_size=8), inner, max_size=4)),
                      max_leaves=12)


def section(cls: type) -> st.SearchStrategy[dict[str, Any]]:
    key = st.one_of(st.sampled_from(_keys(cls)), st.text(max_size=10))
    return st.dictionaries(key, VALUES, max_size=8)


SERVICE = st.fixed_dictionaries(
    {"image": st.one_of(st.just("app:1"), VALUES), "listen": st.one_of(st.just("127.0.0.1:8080"), VALUES),
     "port": st.one_of(st.just(80), VALUES)},
    optional={"readiness": st.one_of(section(Readiness), VALUES), "resources": st.one_of(section(Resources), VALUES),
              "backoff": st.one_of(section(Backoff), VALUES)},
).flatmap(lambda base: section(ServiceConfig).map(lambda extra: base | extra))

DOCUMENTS = st.fixed_dictionaries(
    {"services": st.one_of(st.dictionaries(st.one_of(st.sampled_from(["web", "api", "Bad!", "1"]), st.text(max_size=6)),
                                           SERVICE, max_size=3), VALUES)},
    optional={"settings": st.one_of(section(Settings), VALUES), "extra": VALUES},
)


def validate(data: bytes) -> tuple[int, str, str]:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "services.yaml"
        path.write_bytes(data)
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = cli.main(["validate", "--file-only", str(path)])
    return rc, out.getvalue(), err.getvalue()


def check(data: bytes) -> None:
    rc, out, err = validate(data)
    assert rc in (0, 2), (rc, err)
    assert "Traceback" not in err + out
    lines = err.splitlines()
    if rc == 0:
        said = out.splitlines()
        assert lines == [] and ": ok (" in said[0]
        assert all((line.startswith("  ") and " listens on " in line) or ": services." in line for line in said[1:])
    else:
        assert lines and all(line.startswith("activator: error: ") for line in lines), err
        assert all("services.yaml" in line for line in lines), err


VALID = {"services": {"web": {"image": "app:1", "listen": "127.0.0.1:8080", "port": 80}}}


@fuzz(25)  # with the examples and the sweep, all that three runs of 300 fresh documents reached
@given(DOCUMENTS)
@example(VALID)  # the control: a good file says ok and its addresses
@example({"services": {"web": VALID["services"]["web"] | {"idle_timeout": float("nan"), "max_instances": 2**70}}})
@example({"services": {"web": VALID["services"]["web"] | {"readiness": {"timeout": -1e308}, "resources": [[]]}},
          "settings": {"state_dir": "\x00", "metrics": {"": None}}})
@example({"services": {"Bad!": VALID["services"]["web"], "1": {"image": ["x"], "listen": {}, "port": "80"}}})
# what takes two services or a near miss: an address used twice (checked once each service reads), a misspelt
# key, a missing or empty value
@example({"services": {"web": VALID["services"]["web"], "api": VALID["services"]["web"],
                       "db": VALID["services"]["web"] | {"listen": ":8080"}}})
@example({"services": {"web": VALID["services"]["web"] | {"idle_timout": "5m"},
                       "db": {"image": None, "listen": [], "port": 80}}})
@example({"services": {"cache": {"image": "redis", "ports": ["6379:6379"]}}})  # Compose without its mark
def test_generated_documents(doc: dict[str, Any]) -> None:
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return
    check(text.encode())


#: what every key is given in turn: each kind's parser meets each of these, which a few dozen random documents
#: (each naming a handful of the ~80 keys) would not
SWEEP: list[Any] = [
    None, True, 0, -1, 2**70, -(2**70), 1e308, float("nan"), float("-inf"), "", "x" * 300, "\x00", "üñí", "5s", "-1s",
    "1ns", "512m", "127.0.0.1:0", "[::1]:80", "18:00", "mon-fri 08:00-18:00", "/", "a=b", "tcp", "auto", [], [None],
    ["x", 1], [[[]]], {}, {"": None}, {"x": "y"}, {"nofile": {"soft": 2, "hard": 1}},
]


def every_key(value: Any) -> dict[str, Any]:
    """A services file whose every key (besides the three a service needs to be read further) is value, and every
    key of each section."""
    service = {k: value for k in _keys(ServiceConfig)} | VALID["services"]["web"]
    service |= {name: {k: value for k in _keys(cls)} for name, cls in
                (("readiness", Readiness), ("resources", Resources), ("backoff", Backoff))}
    return {"services": {"web": service}, "settings": {k: value for k in _keys(Settings)}}


@pytest.mark.parametrize("value", SWEEP, ids=lambda v: repr(v)[:24])
def test_every_key_given_each_hostile_value(value: Any) -> None:
    check(yaml.safe_dump(every_key(value), allow_unicode=True).encode())


def test_a_valid_file_says_ok() -> None:
    """Control for check(): its ok branch is reached, and a wrong key is one problem naming the file."""
    rc, out, err = validate(yaml.safe_dump(VALID).encode())
    assert (rc, err) == (0, ""), err
    assert ": ok (" in out and " listens on " in out
    rc, out, err = validate(yaml.safe_dump(every_key(None)).encode())
    assert rc == 2 and err.count("services.yaml") >= 10, err


@fuzz(40)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
@example(b"\xff\xfe" + "services:".encode("utf-16-le"))  # not UTF-8
# nearly as deep as the loader composes (deeper is test_config's "nested too deeply"): what walks values must not
# overflow the stack
@example(b"services: {web: {image: x, listen: 1, port: 80, command: %s}}" % (b"[" * 400 + b"]" * 400))
@example(b"a: &a [x, x, x, x]\nb: &b [*a, *a, *a, *a]\nservices: {web: {image: x, listen: 1, port: 80, "
         b"command: [*b, *b, *b, *b]}}")  # aliases, each value met many times
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@fuzz(30)
@given(st.lists(st.sampled_from(["services:", "  web:", "    image: x", "    port: 80", "    listen: 1",
                                 "  web:", "&a", "*a", "<<: *a", "- ", "{", "}", "[", "]", ": ", "!!binary",
                                 "!!python/object:os.system", "? ", "|", "%YAML 1.1", "---", "...", "\t"]),
                max_size=20).map(lambda parts: "\n".join(parts).encode()))
def test_yaml_shaped_noise(data: bytes) -> None:
    check(data)
