"""Durations, sizes and values as people write them in YAML (pure)."""

from __future__ import annotations

import math
import re
from typing import Any

#: a number with an optional unit, or several with units as Compose and Go write them (1m30s, 1h5m, 2d 12h)
DURATION_PATTERN = r"^\s*(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)?|(?:\d+(?:\.\d+)?\s*(?:ms|s|m|h|d)\s*){2,8})\s*$"
_DURATION_RE = re.compile(DURATION_PATTERN)
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?")
SIZE_PATTERN = r"^\s*(\d+)\s*([kmgKMG]?)[bB]?\s*$"
_SIZE_RE = re.compile(SIZE_PATTERN)
_SIZE_UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}
_DURATION_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0, None: 1.0}


def show(raw: Any) -> str:
    text = repr(raw)
    return f"{type(raw).__name__} {text[:40]}{'...' if len(text) > 40 else ''}"


def parse_duration(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise ValueError(f"expected a duration like 500ms, 5s, 2m, got {show(value)}")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        if not _DURATION_RE.match(value):
            raise ValueError(f"'{value[:40]}' is not a duration (e.g. 500ms, 5s, 2m, 1h, 1m30s)")
        seconds = sum(float(n) * _DURATION_UNITS[unit or None] for n, unit in _DURATION_PART.findall(value))
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{value} is not a finite, non-negative duration")
    return seconds


def parse_size(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"expected a size like 512m, got {show(value)}")
    if isinstance(value, int):
        return value
    m = _SIZE_RE.match(value)
    if not m:
        raise ValueError(f"'{value[:40]}' is not a size (e.g. 256m, 1g, 1048576)")
    return int(m.group(1)) * _SIZE_UNITS[m.group(2).lower()]
