"""Compose's interpolation grammar (activator/config/interpolation.py), one form at a time, as compose-go reads it."""

from __future__ import annotations

import pytest

from activator.config.interpolation import InterpolationError, interpolate

ENV = {"SET": "s", "EMPTY": "", "B": "b", "NESTED": "${SET}"}


def expand(text: str) -> str:
    return interpolate(text, ENV.get).text


@pytest.mark.parametrize(("text", "expected"), [
    ("plain", "plain"),
    ("$$", "$"), ("$$SET", "$SET"), ("$${SET}", "${SET}"), ("a$$$SET", "a$s"),
    ("$SET", "s"), ("$SET-x", "s-x"), ("${SET}", "s"), ("x${SET}y", "xsy"), ("$SET$B", "sb"),
    ("${UNSET}", ""), ("$UNSET", ""),
    # :- when unset or empty, - when unset only
    ("${UNSET:-d}", "d"), ("${EMPTY:-d}", "d"), ("${SET:-d}", "s"),
    ("${UNSET-d}", "d"), ("${EMPTY-d}", ""), ("${SET-d}", "s"),
    # :+ when set and not empty, + when set (even empty)
    ("${SET:+alt}", "alt"), ("${EMPTY:+alt}", ""), ("${UNSET:+alt}", ""),
    ("${SET+alt}", "alt"), ("${EMPTY+alt}", "alt"), ("${UNSET+alt}", ""),
    # ?, :? when the variable is there
    ("${SET:?err}", "s"), ("${EMPTY?err}", ""),
    # nested: the default is interpolated itself (issue 31: `${X:-${B}}` was the literal `${B}`)
    ("${UNSET:-${B}}", "b"), ("${UNSET:-${UNSET2:-deep}}", "deep"), ("${UNSET:-x${B}y}", "xby"),
    ("${SET:+[${B}]}", "[b]"), ("${UNSET:-$B}", "b"), ("${UNSET:-$${B}}", "${B}"),
    ("${UNSET:-a:b-c}", "a:b-c"), ("${UNSET:-}", ""),
    # a value is not interpolated again
    ("${NESTED}", "${SET}"),
    # a $ before anything but a name, { or $ stays
    ("5$", "5$"), ("$ 5", "$ 5"), ("$1", "$1"), ("a$-b", "a$-b"),
    # the default runs to the } that closes its ${, counting each ${ inside
    ("${UNSET:-{x}}", "{x}"), ("${UNSET:-a}b}", "ab}"),
])
def test_each_form(text: str, expected: str) -> None:
    assert expand(text) == expected


def test_a_default_is_only_read_when_used() -> None:
    assert expand("${SET:-${UNSET:?never read}}") == "s"  # A is set: its default's error never happens
    with pytest.raises(InterpolationError, match=r"\$\{UNSET\} is required \(not set\)"):
        expand("${EMPTY:-${UNSET:?}}")


@pytest.mark.parametrize(("text", "message"), [
    ("${UNSET:?set UNSET to the tag}", "${UNSET} is required (not set): set UNSET to the tag"),
    ("${UNSET?}", "${UNSET} is required (not set)"),
    ("${EMPTY:?give it a value}", "${EMPTY} is required (empty): give it a value"),
    ("${UNSET:?need ${B}}", "${UNSET} is required (not set): need b"),
])
def test_required(text: str, message: str) -> None:
    with pytest.raises(InterpolationError) as e:
        expand(text)
    assert str(e.value) == message


@pytest.mark.parametrize(("text", "message"), [
    ("${SET", "'${SET' has no closing '}' (write $$ for a literal $)"),
    ("${UNSET:-${B}", "'${UNSET:-${B}' has no closing '}'"),
    ("${}", "'${}' is not an interpolation: expected ${NAME}, ${NAME:-default}"),
    ("${1X}", "'${1X}' is not an interpolation"),
    ("${A B}", "'${A B}' is not an interpolation"),
    ("${SET:x}", "'${SET:x}' is not an interpolation"),
    ("${SET%%.*}", "'${SET%%.*}' is not an interpolation"),
])
def test_malformed(text: str, message: str) -> None:
    with pytest.raises(InterpolationError) as e:
        expand(text)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)


def test_unset_names_are_reported_once_each_and_defaults_are_not_unset() -> None:
    result = interpolate("${A} $A ${B} ${C:-x} ${D-y} ${E:+z} ${F}", {"B": "b"}.get)
    assert result.text == "  b x y  "
    assert result.unset == ["A", "F"]
