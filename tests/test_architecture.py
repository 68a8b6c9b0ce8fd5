"""The module boundaries docs/architecture.md promises, checked on the import graph (static, no engine)."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "activator"


def imports(module: str) -> set[str]:
    tree = ast.parse((PKG / f"{module}.py").read_text())
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level == 1:
            if node.module:
                found.add(node.module.split(".")[0])
            else:
                found.update(alias.name for alias in node.names)
    return found


def reachable(module: str) -> set[str]:
    seen: set[str] = set()
    todo = [module]
    while todo:
        m = todo.pop()
        for dep in imports(m) - seen:
            seen.add(dep)
            todo.append(dep)
    return seen


def test_the_runtime_path_never_reaches_the_builder_or_the_lifecycle() -> None:
    for module in ("proxy", "service", "instance", "sandbox", "checkpoint", "capacity"):
        deps = reachable(module)
        assert "builder" not in deps and "server" not in deps and "images" not in deps, (module, deps)


def test_one_shot_commands_do_not_import_the_lifecycle() -> None:
    assert "server" not in reachable("host") | reachable("statedir")
    tree = ast.parse((PKG / "cli.py").read_text())
    for fn in (n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name in
               ("cmd_checkpoint", "cmd_cleanup", "cmd_inspect", "cmd_status", "cmd_validate")):
        mods = {n.module for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)}
        assert "server" not in mods, fn.name


def test_pure_modules_do_no_io() -> None:
    for module in ("capacity", "proxy_protocol", "spec", "config", "yamlload"):
        deps = reachable(module)
        assert not deps & {"runc", "sandbox", "netns", "rootfs", "images", "cgroups", "server", "proxy"}, module
