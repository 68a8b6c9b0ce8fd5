"""What translating one Compose service carries along: where it is (for one-line errors), what the file around it
declares, the notes and problems found so far; and the mark that makes a file a Compose file for activator."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from activator.errors import ConfigError, combined

MARK = "x-activator"


@dataclass(frozen=True)
class Context:
    at: str  # "FILE: services.NAME"
    base: Path
    env: Mapping[str, str]
    top_volumes: Mapping[str, Any]
    served: set[str]
    notes: list[str]
    #: the served services' bodies, interpolated (a dependency's healthcheck is looked up there)
    bodies: Mapping[str, Any] = field(default_factory=dict)
    gateway: str = "10.89.0.1"
    problems: list[str] = field(default_factory=list)

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(f"{self.at}.{key}: {problem}")

    def note(self, key: str, why: str) -> None:
        self.tell(key, f"ignored: {why}")

    def tell(self, key: str, text: str) -> None:
        self.notes.append(f"{self.at.split(': ', 1)[1]}{'.' + key if key else ''}: {text}")

    @contextlib.contextmanager
    def collect(self) -> Iterator[None]:
        """A problem in the block is kept, and the translation goes on to find the others."""
        try:
            yield
        except ConfigError as e:
            self.problems.extend(e.lines)


def all_of(problems: list[str]) -> ConfigError:
    """One error for all of them (ConfigErrors when there are several: each its own line)."""
    error = combined([ConfigError(p) for p in problems])
    assert isinstance(error, ConfigError)  # all of them are
    return error


def is_set(value: Any) -> bool:
    """Whether a key says something (`tty: false`, `init: null` and `sysctls: {}` say nothing)."""
    return value is not None and value is not False and value != "" and value != [] and value != {}
