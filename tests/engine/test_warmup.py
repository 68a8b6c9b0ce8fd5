"""Warm-up before the dump: the template answers the configured requests first, and a warm-up that nothing
answers is a one-line error (its paths are wrong)."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from tests.conftest import ECHO, HTTPD, echo, write_config

from .test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.engine


@pytest.mark.asyncio
async def test_the_template_is_warmed_up_before_the_dump(start, caplog) -> None:  # type: ignore[no-untyped-def]
    caplog.set_level(logging.INFO)
    run = await start({"web": HTTPD | {"warmup": {"http_paths": ["/", "/index.html"], "count": 5}},
                       "echo": ECHO | {"warmup": {"payload": "warm\n", "count": 3}}})
    lines = [r.getMessage() for r in caplog.records if "warmed up" in r.getMessage()]
    assert any("service=web warmed up: 10 of 10" in ln for ln in lines), lines
    assert any("service=echo warmed up: 3 of 3" in ln for ln in lines), lines
    assert await echo(run.port("echo"), b"after") == b"after"
    # The warm-up shapes the checkpoint: another warm-up is another checkpoint.
    base = run.act.services["web"].config
    other = type(base)(**{**base.__dict__, "warmup": type(base.warmup)(http_paths=("/",), count=1)})
    assert other.checkpoint_fingerprint() != base.checkpoint_fingerprint()


def test_a_warmup_nothing_answers_is_a_one_line_error(tmp_path: Path) -> None:
    cfg = write_config(tmp_path, {"web": HTTPD | {"warmup": {"http_paths": ["/no-such-page"], "count": 2}}})
    assert_one_line_error(run_cli("checkpoint", "web", "-c", str(cfg)), "service 'web'",
                          "none of the 2 warm-up requests was answered", "fix 'warmup'")
