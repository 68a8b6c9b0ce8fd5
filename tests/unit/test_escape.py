"""The one filter for untrusted text shown to an operator (errors.escape): error lines, log lines, `activator
inspect`, `activator logs`. Hostile input: C0 and C1 controls (raw and as UTF-8), bidi overrides and isolates,
bytes that are not UTF-8; the control: ordinary text, non-ASCII letters included, comes through as it is."""

from __future__ import annotations

import io
import logging

import pytest

from activator.cli.logformat import Escaped
from activator.cli.render import TerminalSafe
from activator.errors import ActivatorError, escape, one_line, terminal_safe

ORDINARY = "web-1: 200 OK, café naïve 東京 — ünïcödé; tab\there"


@pytest.mark.parametrize(("hostile", "shown"), [
    ("\x1b]0;owned\x07", "\\x1b]0;owned\\x07"),  # OSC: retitle the window
    ("\x9b2J", "\\x9b2J"),  # C1 CSI (U+009B): clear the screen on terminals that honour 8-bit controls
    ("\x9d0;owned\x9c", "\\x9d0;owned\\x9c"),  # C1 OSC ... ST
    ("\x85next", "\\x85next"),  # NEL: a new line
    ("admin\u202egnp.exe", "admin\\u202egnp.exe"),  # RLO: reads "exe.png"
    ("\u2066x\u2069", "\\u2066x\\u2069"),  # isolates
    ("a\u200bb", "a\\u200bb"),  # zero width space
    ("l1\u2028l2", "l1\\u2028l2"),
    ("cr\roverwrite", "cr\\x0doverwrite"),
    ("nl\nforged line", "nl\\nforged line"),
])
def test_one_line_escapes_what_a_terminal_would_act_on(hostile: str, shown: str) -> None:
    assert one_line(hostile) == shown
    assert str(ActivatorError(f"archive: {hostile}")) == f"archive: {shown}"


def test_ordinary_text_is_shown_as_it_is() -> None:
    assert escape(ORDINARY, keep="\t") == ORDINARY
    assert terminal_safe(ORDINARY.encode() + b"\n") == ORDINARY.encode() + b"\n"


def test_an_apps_bytes_raw_c1_and_utf8_c1_are_escaped() -> None:
    hostile = b"ok\xc2\x9b2J \x9b2J \xe2\x80\xae bad\xff\n"
    assert terminal_safe(hostile) == b"ok\\x9b2J \\x9b2J \\u202e bad\\xff\n"


def test_a_character_split_between_writes_is_kept_whole() -> None:
    raw = io.BytesIO()
    out = TerminalSafe(raw)
    data = "é\x1b[2J\n".encode()
    out.write(data[:1])
    out.write(data[1:])
    out.flush()
    assert raw.getvalue() == "é\\x1b[2J\n".encode()


def test_log_lines_are_escaped() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.addFilter(Escaped())
    handler.setFormatter(logging.Formatter("%(message)s"))
    log = logging.getLogger("test-escape")
    log.addHandler(handler)
    log.propagate = False
    try:
        log.warning("service=%s said %s", "web", "\x1b]0;owned\x07\u202e\x9b")
        log.warning("plain %s", ORDINARY)
    finally:
        log.removeHandler(handler)
    assert stream.getvalue().splitlines() == ["service=web said \\x1b]0;owned\\x07\\u202e\\x9b",
                                              "plain " + ORDINARY.replace("\t", "\\t")]
