"""Compose's variable interpolation, as docker compose (compose-go's template package) does it (pure).

    $$                 a literal $
    $NAME  ${NAME}     NAME's value; unset: an empty string (and the caller is told, as compose warns)
    ${NAME:-default}   default when NAME is unset or empty     ${NAME-default}   only when unset
    ${NAME:?error}     an error when NAME is unset or empty    ${NAME?error}     only when unset
    ${NAME:+alt}       alt when NAME is set and not empty      ${NAME+alt}       when set, even empty

A default, alternative or error text is interpolated itself, and only when it is used: `${A:-${B:-x}}` is B's
value or x when A is unset, and `${A:-${B:?}}` is no error while A is set. The text after the operator runs to the
`}` that closes the `${` (each `${` inside opens one more), as compose-go counts. NAME is a letter or `_`, then
letters, digits and `_`. A `$` before anything else stays a `$`; `${` that is not one of the forms above is an error.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATORS = (":-", ":?", ":+", "-", "?", "+")


class InterpolationError(ValueError):
    """One line: what is wrong with the text (the caller says where it is)."""


@dataclass
class Result:
    text: str
    #: names used without a default that were unset (compose warns and uses an empty string)
    unset: list[str] = field(default_factory=list)


def interpolate(text: str, lookup: Callable[[str], str | None]) -> Result:
    result = Result("")
    result.text = _expand(text, lookup, result)
    return result


def _expand(text: str, lookup: Callable[[str], str | None], result: Result) -> str:
    out: list[str] = []
    i = 0
    while True:
        j = text.find("$", i)
        if j < 0:
            out.append(text[i:])
            return "".join(out)
        out.append(text[i:j])
        nxt = text[j + 1:j + 2]
        if nxt == "$":
            out.append("$")
            i = j + 2
        elif nxt == "{":
            end = _closing(text, j + 2)
            if end < 0:
                raise InterpolationError(f"'{_clip(text[j:])}' has no closing '}}' (write $$ for a literal $)")
            out.append(_braced(text[j + 2:end], lookup, result))
            i = end + 1
        elif m := _NAME.match(text, j + 1):
            out.append(_value(m.group(), lookup, result))
            i = m.end()
        else:
            out.append("$")
            i = j + 1


def _closing(text: str, start: int) -> int:
    """The index of the `}` that closes a `${` whose body starts at `start`, or -1."""
    depth = 1
    i = start
    while i < len(text):
        if text[i] == "}":
            depth -= 1
            if depth == 0:
                return i
        elif text.startswith("${", i):
            depth += 1
            i += 1
        i += 1
    return -1


def _braced(body: str, lookup: Callable[[str], str | None], result: Result) -> str:
    m = _NAME.match(body)
    rest = body[m.end():] if m else body
    op = next((o for o in _OPERATORS if rest.startswith(o)), None) if rest else ""
    if m is None or op is None:
        raise InterpolationError(f"'${{{_clip(body)}}}' is not an interpolation: expected ${{NAME}}, "
                                 "${NAME:-default}, ${NAME-default}, ${NAME:?error}, ${NAME?error}, ${NAME:+alt} or "
                                 "${NAME+alt} (write $$ for a literal $)")
    name = m.group()
    if not op:
        return _value(name, lookup, result)
    arg = rest[len(op):]
    value = lookup(name)
    missing = value is None or (op.startswith(":") and value == "")
    if op in (":-", "-"):
        return _expand(arg, lookup, result) if missing else str(value)
    if op in (":+", "+"):
        return "" if missing else _expand(arg, lookup, result)
    if missing:  # :? and ?
        why = _expand(arg, lookup, result)
        state = "not set" if value is None else "empty"
        raise InterpolationError(f"${{{name}}} is required ({state}): {why}" if why else
                                 f"${{{name}}} is required ({state})")
    return str(value)


def _value(name: str, lookup: Callable[[str], str | None], result: Result) -> str:
    value = lookup(name)
    if value is None:
        if name not in result.unset:
            result.unset.append(name)
        return ""
    return value


def _clip(text: str) -> str:
    return text if len(text) <= 40 else text[:40] + "..."
