"""Value kinds: each parses one YAML value, describes itself in JSON Schema and in the reference
(docs/configuration.md), and shows a value as a file would write it. The kinds of one concern live beside it
(addresses.py, mounts.py, probes.py, process.py); these are the plain ones.

Pure: no I/O.
"""

from __future__ import annotations

import contextlib
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from . import schedule
from .units import DURATION_PATTERN, SIZE_PATTERN, parse_duration, parse_size
from .units import show as _show

MINUTE, HOUR, DAY = 60.0, 3600.0, 86400.0
MiB = 2**20


def human_duration(seconds: float) -> str:
    if seconds == 0:
        return "0"
    for unit, size in (("d", DAY), ("h", HOUR), ("m", MINUTE), ("s", 1.0)):
        if seconds >= size and (seconds / size).is_integer():
            return f"{seconds / size:g}{unit}"
    return f"{seconds * 1000:g}ms"


def human_size(n: int) -> str:
    for unit, size in (("g", 2**30), ("m", 2**20), ("k", 2**10)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return str(n)


class Kind:
    def parse(self, raw: Any) -> Any:
        raise NotImplementedError

    def schema(self) -> dict[str, Any]:
        raise NotImplementedError

    def describe(self) -> tuple[str, str]:
        """For the reference: how a value of this kind is written, and what values it takes."""
        raise NotImplementedError

    def show(self, value: Any) -> str:
        """A (default) value as a file would write it."""
        return f"[{', '.join(map(str, value))}]" if isinstance(value, tuple) else str(value)


@dataclass(frozen=True)
class Duration(Kind):
    min: float
    max: float

    def parse(self, raw: Any) -> float:
        value = parse_duration(raw)
        if not self.min <= value <= self.max:
            raise ValueError(f"{human_duration(value)} is out of range: "
                             f"use {human_duration(self.min)} to {human_duration(self.max)}")
        return value

    def describe(self) -> tuple[str, str]:
        return ("duration (seconds, or 250ms, 5s, 2m, 1h, 1d, 1m30s)",
                f"{human_duration(self.min)} to {human_duration(self.max)}")

    def show(self, value: Any) -> str:
        return human_duration(value)

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "number", "minimum": self.min, "maximum": self.max},
                          {"type": "string", "pattern": DURATION_PATTERN}],
                "description": f"a duration, {human_duration(self.min)} to {human_duration(self.max)} "
                               "(seconds, or 250ms, 5s, 2m, 1h, 1d)"}


@dataclass(frozen=True)
class Size(Kind):
    min: int
    max: int

    def parse(self, raw: Any) -> int:
        value = parse_size(raw)
        if not self.min <= value <= self.max:
            raise ValueError(f"{value} bytes is out of range: use {self.min // MiB}m to {self.max // 2**30}g")
        return value

    def describe(self) -> tuple[str, str]:
        return "size (bytes, or with k, m, g)", f"{human_size(self.min)} to {human_size(self.max)}"

    def show(self, value: Any) -> str:
        return human_size(value)

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "integer", "minimum": self.min, "maximum": self.max},
                          {"type": "string", "pattern": SIZE_PATTERN}]}


@dataclass(frozen=True)
class Int(Kind):
    min: int
    max: int

    def parse(self, raw: Any) -> int:
        if isinstance(raw, bool) or not isinstance(raw, int):
            raise ValueError(f"expected a whole number, got {_show(raw)}")
        if not self.min <= raw <= self.max:
            raise ValueError(f"{raw} is out of range: use {self.min} to {self.max}")
        return raw

    def describe(self) -> tuple[str, str]:
        return "whole number", f"{self.min} to {self.max}"

    def schema(self) -> dict[str, Any]:
        return {"type": "integer", "minimum": self.min, "maximum": self.max}


@dataclass(frozen=True)
class Number(Kind):
    min: float  # exclusive
    max: float

    def parse(self, raw: Any) -> float:
        if isinstance(raw, bool) or not isinstance(raw, int | float):
            raise ValueError(f"expected a number, got {_show(raw)}")
        if not (math.isfinite(raw) and self.min < raw <= self.max):
            raise ValueError(f"{raw} is out of range: use more than {self.min:g}, up to {self.max:g}")
        return float(raw)

    def describe(self) -> tuple[str, str]:
        return "number", f"more than {self.min:g}, up to {self.max:g}"

    def schema(self) -> dict[str, Any]:
        return {"type": "number", "exclusiveMinimum": self.min, "maximum": self.max}


@dataclass(frozen=True)
class Percent(Kind):
    """A share of one CPU: "2%", or a fraction like 0.02."""

    max: float  # as a fraction

    def parse(self, raw: Any) -> float:
        value: Any = raw
        if isinstance(raw, str) and raw.strip().endswith("%"):
            with contextlib.suppress(ValueError):
                value = float(raw.strip()[:-1]) / 100
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"expected a percentage like 2% (or a fraction like 0.02), got {_show(raw)}")
        if not (math.isfinite(value) and 0 < value <= self.max):
            raise ValueError(f"{raw} is out of range: use more than 0%, up to {self.max * 100:g}%")
        return float(value)

    def describe(self) -> tuple[str, str]:
        return "share of one CPU (2%, or 0.02)", f"more than 0%, up to {self.max * 100:g}%"

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": self.max},
                          {"type": "string", "pattern": r"^[0-9.]+%$"}]}


@dataclass(frozen=True)
class Schedule(Kind):
    """keep_alive_schedule: a list of windows (config/schedule.py)."""

    def parse(self, raw: Any) -> tuple[schedule.Window, ...]:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not all(isinstance(v, str) for v in items):
            raise ValueError("expected a list of windows like 'mon-fri 08:00-18:00'")
        if len(items) > 64:
            raise ValueError("more than 64 windows")
        return tuple(schedule.parse_window(v) for v in items)

    def describe(self) -> tuple[str, str]:
        return "window or list of windows '[DAYS] HH:MM-HH:MM'", "up to 64 windows; days mon..sun, ranges, lists, *"

    def schema(self) -> dict[str, Any]:
        one = {"type": "string", "pattern": r"^\s*(\S+\s+)?[0-9]{2}:[0-9]{2}-[0-9]{2}:[0-9]{2}\s*$"}
        return {"oneOf": [one, {"type": "array", "items": one, "maxItems": 64}]}


@dataclass(frozen=True)
class Protocols(Kind):
    """protocol: tcp, udp, or both as a list ([tcp, udp], as a DNS server listens)."""

    def parse(self, raw: Any) -> tuple[str, ...]:
        items = [raw] if isinstance(raw, str) else raw
        if not isinstance(items, list) or not items or not all(v in ("tcp", "udp") for v in items):
            raise ValueError(f"expected tcp, udp or [tcp, udp], got {_show(raw)}")
        return tuple(p for p in ("tcp", "udp") if p in items)

    def describe(self) -> tuple[str, str]:
        return "tcp, udp, or [tcp, udp]", "tcp, udp"

    def schema(self) -> dict[str, Any]:
        one = {"type": "string", "enum": ["tcp", "udp"]}
        return {"oneOf": [one, {"type": "array", "items": one, "minItems": 1, "uniqueItems": True}]}


@dataclass(frozen=True)
class Text(Kind):
    choices: tuple[str, ...] = ()
    pattern: str | None = None
    hint: str = ""

    def parse(self, raw: Any) -> str:
        if not isinstance(raw, str):
            raise ValueError(f"expected a string, got {_show(raw)}" + (f" ({self.hint})" if self.hint else ""))
        if self.choices and raw not in self.choices:
            raise ValueError(f"'{raw}' is not one of: {', '.join(self.choices)}")
        if self.pattern and not re.fullmatch(self.pattern, raw):
            raise ValueError(f"'{raw}' is not valid" + (f" ({self.hint})" if self.hint else ""))
        if not raw:
            raise ValueError("must not be empty")
        return raw

    def describe(self) -> tuple[str, str]:
        if self.choices:
            return f"one of {', '.join(self.choices)}", ", ".join(self.choices)
        return "string", self.hint or "not empty"

    def schema(self) -> dict[str, Any]:
        s: dict[str, Any] = {"type": "string", "minLength": 1}
        if self.choices:
            s["enum"] = list(self.choices)
        if self.pattern:
            s["pattern"] = self.pattern
        return s


@dataclass(frozen=True)
class AbsPath(Kind):
    def parse(self, raw: Any) -> Path:
        if not isinstance(raw, str) or not raw.startswith("/"):
            raise ValueError(f"expected an absolute path, got {_show(raw)}")
        return Path(raw)

    def describe(self) -> tuple[str, str]:
        return "absolute path", "a path starting with /"

    def schema(self) -> dict[str, Any]:
        return {"type": "string", "pattern": "^/"}


@dataclass(frozen=True)
class Args(Kind):
    """A command: a string (one argument) or a list of strings and numbers."""

    def parse(self, raw: Any) -> tuple[str, ...]:
        if isinstance(raw, str):
            return (raw,)
        if not isinstance(raw, list) or not all(isinstance(v, str | int | float) and not isinstance(v, bool)
                                                for v in raw):
            raise ValueError("expected a string or a list of strings")
        if len(raw) > 4096:
            raise ValueError("more than 4096 arguments")
        return tuple(str(v) for v in raw)

    def describe(self) -> tuple[str, str]:
        return "string (one argument), or a list of strings", "up to 4096 items"

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "string"}, {"type": "array", "items": {"type": ["string", "number"]}}]}


@dataclass(frozen=True)
class Flag(Kind):
    def parse(self, raw: Any) -> bool:
        if not isinstance(raw, bool):
            raise ValueError(f"expected true or false, got {_show(raw)}")
        return raw

    def describe(self) -> tuple[str, str]:
        return "true or false", "true, false"

    def schema(self) -> dict[str, Any]:
        return {"type": "boolean"}


@dataclass(frozen=True)
class AutoFlag(Kind):
    """true, false, or auto (decided from the rest of the file)."""

    def parse(self, raw: Any) -> bool | str:
        if isinstance(raw, bool) or raw == "auto":
            return raw  # type: ignore[no-any-return]
        raise ValueError(f"expected true, false or auto, got {_show(raw)}")

    def describe(self) -> tuple[str, str]:
        return "true, false, or auto", "true, false, auto"

    def schema(self) -> dict[str, Any]:
        return {"oneOf": [{"type": "boolean"}, {"const": "auto"}]}


@dataclass(frozen=True)
class AbsPaths(Kind):
    """One absolute path or a list of them."""

    def parse(self, raw: Any) -> tuple[Path, ...]:
        items = raw if isinstance(raw, list) else [raw]
        return tuple(AbsPath().parse(i) for i in items)

    def describe(self) -> tuple[str, str]:
        return "absolute path, or a list of them", "paths starting with /"

    def schema(self) -> dict[str, Any]:
        one = AbsPath().schema()
        return {"oneOf": [one, {"type": "array", "items": one}]}
