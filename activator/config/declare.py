"""How a key is declared: key() on a dataclass field (its kind, default, doc, and whether it shapes the
checkpointed process), Section for a nested mapping, and the JSON Schema of a declared dataclass.

Pure: no I/O.
"""

from __future__ import annotations

import ipaddress
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any

from .addresses import ListenAddress
from .kinds import Kind


@dataclass(frozen=True)
class Section(Kind):
    """A nested mapping, parsed into its own dataclass."""

    cls: type

    def describe(self) -> tuple[str, str]:
        return "mapping (the keys below)", "see its keys"

    def schema(self) -> dict[str, Any]:
        return object_schema(self.cls)


def key(kind: Kind, default: Any = MISSING, *, doc: str, nullable: bool = False, shapes: bool = False,
        factory: Any = MISSING) -> Any:
    """Declare a config key: how it is parsed, its default, what it means, and whether it shapes the
    checkpointed process (changing such a key rebuilds the checkpoint)."""
    meta = {"kind": kind, "doc": doc, "nullable": nullable, "shapes": shapes}
    if factory is not MISSING:
        return field(default_factory=factory, metadata=meta)
    if default is MISSING:
        return field(metadata=meta)
    return field(default=default, metadata=meta)


def object_schema(cls: type) -> dict[str, Any]:
    props: dict[str, Any] = {}
    required = []
    for f in fields(cls):
        if "kind" not in f.metadata:
            continue
        s = dict(f.metadata["kind"].schema())
        if f.metadata["nullable"]:
            s = {"oneOf": [s, {"type": "null"}]}
        s["description"] = f.metadata["doc"]
        if f.default is not MISSING and f.default is not None:
            d = f.default
            s["default"] = (str(d) if isinstance(d, Path | ListenAddress | ipaddress.IPv4Network)
                            else list(d) if isinstance(d, tuple) else d)
        if f.default is MISSING and f.default_factory is MISSING:
            required.append(f.name)
        props[f.name] = s
    out: dict[str, Any] = {"type": "object", "properties": props, "additionalProperties": False}
    if required:
        out["required"] = required
    if cls.__doc__ and not cls.__doc__.startswith(cls.__name__ + "("):
        out["description"] = cls.__doc__.strip().splitlines()[0]
    return out
