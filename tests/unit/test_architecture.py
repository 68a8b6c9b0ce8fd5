"""The house's floors, checked on the import graph (static, no engine): each package imports only the floors below
it, plain logic does no I/O, and the one-shot commands and the runtime path never reach the lifecycle."""

from __future__ import annotations

import ast
import functools
from pathlib import Path

from .sourcetree import PKG, sources

#: what each part of activator may import (besides itself); every module belongs to exactly one part
ALLOWED: dict[str, set[str]] = {
    "errors": set(),
    "tasks": set(),
    "config": {"errors"},
    "core": {"config", "errors"},
    "statedir": {"config", "errors"},
    "net": {"config", "core", "errors", "statedir", "tasks"},
    "runtime": {"config", "core", "errors", "statedir", "tasks", "net"},
    "checkpoints": {"config", "core", "errors", "statedir", "tasks", "net", "runtime"},
    "daemon": {"config", "core", "errors", "statedir", "tasks", "net", "runtime", "checkpoints", "__init__"},
    "cli": {"config", "core", "errors", "statedir", "tasks", "net", "runtime", "checkpoints", "daemon", "__init__"},
    "__main__": {"cli"},
    "__init__": set(),
}
#: plain logic: no I/O, no clock, no processes (a time is passed in)
PURE_FORBIDDEN = {"os", "socket", "subprocess", "time", "asyncio", "pathlib", "shutil", "fcntl", "ctypes", "select"}


# modules() and graph() are made once per run, as sourcetree reads the tree once (it does not change under the
# tests); callers do not change what they return.
@functools.cache
def modules() -> dict[str, Path]:
    """Dotted name under activator -> file."""
    out = {}
    for p in sources():
        parts = list(p.relative_to(PKG).with_suffix("").parts)
        if parts[-1] == "__init__" and len(parts) > 1:
            parts = parts[:-1]
        out[".".join(parts)] = p
    return out


def part(module: str) -> str:
    return module.split(".")[0]


def imports(module: str, path: Path) -> set[str]:
    """The activator modules (dotted, under activator) this one imports, relative imports resolved."""
    here = module.split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    found: set[str] = set()
    for node in sources()[path].imports:
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                target = [*base, *(node.module.split(".") if node.module else [])]
            elif node.module and node.module.split(".")[0] == "activator":
                target = node.module.split(".")[1:]
            else:
                continue
            if target:
                found.add(".".join(target))
            for alias in node.names:  # `from . import x`: x may be a module
                found.add(".".join([*target, alias.name]))
        elif isinstance(node, ast.Import):
            found.update(a.name.removeprefix("activator.") for a in node.names if a.name.startswith("activator."))
    return found


@functools.cache
def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: {d for d in imports(m, p) if d in mods or part(d) in ALLOWED} for m, p in mods.items()}


def reachable(start: str, g: dict[str, set[str]]) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for dep in g.get(todo.pop(), set()) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_every_module_belongs_to_a_floor() -> None:
    assert {part(m) for m in modules()} <= set(ALLOWED), "a new top-level module or package: give it a floor"


def test_each_floor_imports_only_the_floors_below() -> None:
    bad = []
    for module, deps in graph().items():
        for dep in deps:
            if part(dep) != part(module) and part(dep) not in ALLOWED[part(module)]:
                bad.append(f"{module} -> {dep}")
    assert not bad, "imports against the floors (see activator/*/__init__.py):\n" + "\n".join(sorted(bad))


def test_plain_logic_does_no_io() -> None:
    for module, path in modules().items():
        if part(module) not in ("core", "config"):
            continue
        stdlib: set[str] = set()
        for node in sources()[path].imports:
            if isinstance(node, ast.Import):
                stdlib.update(a.name.split(".")[0] for a in node.names)
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                stdlib.add(node.module.split(".")[0])
        forbidden = PURE_FORBIDDEN - ({"os", "pathlib"} if part(module) == "config" else set())  # it reads its file
        assert not stdlib & forbidden, (module, stdlib & forbidden)


def test_the_runtime_path_never_reaches_the_builder_or_the_lifecycle() -> None:
    g = graph()
    for module in ("daemon.proxy", "daemon.service", "checkpoints.instance", "runtime.sandbox", "checkpoints.store",
                   "core.capacity"):
        deps = reachable(module, g)
        assert not deps & {"checkpoints.builder", "checkpoints.exchange", "checkpoints.template", "daemon.server",
                           "checkpoints.images"}, (module, deps)


def test_one_shot_commands_do_not_import_the_lifecycle() -> None:
    g = graph()
    assert "daemon.server" not in reachable("checkpoints.host", g) | reachable("statedir", g)
    assert "daemon.server" in reachable("cli.run", g)  # the control: `run` does, and the graph sees it
    for module in ("cli.checkpoint", "cli.cleanup", "cli.control", "cli.inspection", "cli.observe", "cli.validate"):
        assert "daemon.server" not in reachable(module, g), module


def test_no_import_cycles_between_modules() -> None:
    g = graph()
    inner = {m: {d for d in deps if d in g} for m, deps in g.items()}
    for module in g:
        assert module not in reachable(module, inner), f"{module} imports itself back"
