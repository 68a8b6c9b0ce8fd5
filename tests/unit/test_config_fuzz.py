"""Property: whatever file `activator validate` is given, it answers with exit code 0 or 2, never a traceback:
"ok" and each service's addresses, or its problems, each on one line naming the file (issue 31: all of them).
Documents are generated from the real keys (so most get deep into validation) with hostile values (NaN, huge
numbers, wrong types, nesting, aliases), plus arbitrary text and bytes."""

from __future__ import annotations

import contextlib
import io
import tempfile
from dataclasses import fields
from pathlib import Path
from typing import Any

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from activator import cli
from activator.config.model import Backoff, Readiness, Resources, ServiceConfig, Settings


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


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(DOCUMENTS)
def test_generated_documents(doc: dict[str, Any]) -> None:
    try:
        text = yaml.safe_dump(doc, allow_unicode=True)
    except (yaml.YAMLError, ValueError):
        return
    check(text.encode())


@settings(max_examples=200, deadline=None)
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode)))
def test_arbitrary_bytes(data: bytes) -> None:
    check(data)


@settings(max_examples=100, deadline=None)
@given(st.lists(st.sampled_from(["services:", "  web:", "    image: x", "    port: 80", "    listen: 1",
                                 "  web:", "&a", "*a", "<<: *a", "- ", "{", "}", "[", "]", ": ", "!!binary",
                                 "!!python/object:os.system", "? ", "|", "%YAML 1.1", "---", "...", "\t"]),
                max_size=20).map(lambda parts: "\n".join(parts).encode()))
def test_yaml_shaped_noise(data: bytes) -> None:
    check(data)
