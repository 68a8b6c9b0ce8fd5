"""A Compose service's environment: `environment`, `env_file` files and the `.env` file, read as docker compose
reads them (python-dotenv's parser, interpolation, a bare KEY from the environment)."""

from __future__ import annotations

import io
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dotenv.parser import parse_stream

from .composecontext import Context, all_of
from .interpolation import InterpolationError, interpolate


def environment(raw: Any, ctx: Context) -> dict[str, str]:
    """A mapping or KEY=VALUE list; a bare KEY (or KEY: null) takes KEY from the environment, as Compose does,
    and is left out when unset. Booleans are refused as Compose refuses them."""
    if raw is None:
        return {}
    out: dict[str, str] = {}
    if isinstance(raw, Mapping):
        items: list[tuple[str, Any]] = [(str(k), v) for k, v in raw.items()]
    elif isinstance(raw, list):
        items = []
        for item in raw:
            key, sep, value = str(item).partition("=")
            items.append((key, value if sep else None))
    else:
        raise ctx.error("environment", "expected a mapping or a list of KEY=VALUE")
    bad: list[str] = []
    for key, value in items:
        if isinstance(value, bool):
            bad.append(str(ctx.error(f"environment.{key}", f"{str(value).lower()} is a boolean; Compose wants a "
                                                           f"string: quote it ('{str(value).lower()}')")))
        elif value is None:
            if key in ctx.env:
                out[key] = ctx.env[key]
        else:
            out[key] = str(value)
    if bad:
        raise all_of(bad)
    return out


def env_files(raw: Any, ctx: Context) -> dict[str, str]:
    if raw is None:
        return {}
    entries = raw if isinstance(raw, list) else [raw]
    out: dict[str, str] = {}
    problems: list[str] = []
    for entry in entries:
        file, required = (entry.get("path"), entry.get("required", True)) if isinstance(entry, Mapping) \
            else (entry, True)
        p = ctx.base / str(file)
        if not p.is_file():
            if required:
                problems.append(f"{ctx.at}.env_file: {p} does not exist")
            continue
        values = dotenv(p, ctx.at, ctx.env.get, problems)
        out.update({k: v for k, v in values.items() if v is not None})
    if problems:
        raise all_of(problems)
    return out


def dotenv(p: Path, at: str, lookup: Any, problems: list[str]) -> dict[str, str | None]:
    """A .env or env_file file as docker compose reads it (python-dotenv's parser: quotes, escapes in double
    quotes, `export`, comments); unquoted and double-quoted values interpolated from `lookup` and the file's
    earlier keys, single-quoted ones as they are. A bare KEY takes KEY from `lookup` (left out when unset).
    Malformed lines are added to `problems`, one each."""
    try:
        text = p.read_text()
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError) as e:
        problems.append(f"{at}: cannot read {p}: {e}")
        return {}
    out: dict[str, str | None] = {}

    def known(name: str) -> str | None:
        value = lookup(name)
        return value if value is not None else out.get(name)

    for binding in parse_stream(io.StringIO(text)):
        line = binding.original.line + len(binding.original.string) - len(binding.original.string.lstrip("\n"))
        if binding.error:
            problems.append(f"{at}: {p} line {line}: expected KEY=VALUE")
            continue
        if binding.key is None:
            continue  # a comment or a blank line
        if binding.value is None:
            out[binding.key] = lookup(binding.key)
            continue
        written = binding.original.string.strip().removeprefix("export").lstrip()
        written = written.split("=", 1)[1].lstrip() if "=" in written else ""
        if written.startswith("'"):
            out[binding.key] = binding.value
            continue
        try:
            out[binding.key] = interpolate(binding.value, known).text
        except InterpolationError as e:
            problems.append(f"{at}: {p} line {line}: {e}")
    return out
